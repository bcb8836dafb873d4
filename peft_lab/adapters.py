"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel: He et al. 2022), notebook 03.

The equations of notebook 03 ("Adapters"), for a model of width ``d`` and a bottleneck of size ``m``:

* (03.1) the bottleneck ``f(h) = W_up · act(W_down · h + b_down) + b_up``, ``W_down: m × d``, ``W_up: d × m``;
  ``m = d / reduction_factor``
* (03.2) trainable parameters per adapter: ``2 m d + m + d`` (two weights, two biases)
* (03.3) placement in a pre-LN block with ``x₁ = x + a`` (``a`` the attention output) and ``y`` the
  feed-forward (MLP) output (``m`` is the bottleneck size):

  - Houlsby (two adapters per block, on each sublayer's output before its residual add):
    ``x₁ = (f_a(a) + a) + x``,  ``out = (f_y(y) + y) + x₁``
  - Pfeiffer (one adapter per block, after the MLP, fed the block's usual output ``z = y + x₁``):
    ``out = (f(z) + y) + x₁``
  - parallel (one adapter beside the MLP, fed the MLP's input stream ``x₁``, scaled by ``s``):
    ``out = (s · f(x₁) + y) + x₁``

* (03.4) init ``"zero"``: ``W_up = 0, b_up = 0`` (``W_down`` kaiming-uniform, ``b_down = 0``), so ``f ≡ 0`` and the
  model is *exactly* the base model at step 0. ``"bert"`` (AdapterHub's default) draws both weights from
  N(0, 0.02²) and ``"houlsby"`` from a normal with std 10⁻² truncated at ±2·10⁻²: near, not exactly, identity.

The additions happen in exactly the order written above — the order AdapterHub ``adapters`` 1.3.0 uses on
GPT-2 (``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``) — so our outputs equal AdapterHub's bit for bit;
``peft_lab.interop_adapterhub`` moves weights between the two.

How it sits in the model: the sublayer (``attn`` or ``mlp``) is wrapped in a :class:`BottleneckAdapter`
(``base_layer`` + ``adapter_down`` + ``adapter_up``, AdapterHub's names). Pfeiffer and parallel adapters also
need ``x₁``, the stream entering the MLP's layer norm: that norm is wrapped in a :class:`ResidualTap` that
hands its input to the adapter. Works on GPT-2 and llama-style models (llama, mistral, qwen2).

Typical use::

    model = apply_adapters(model, placement="pfeiffer", reduction_factor=16)  # freezes the base
    ...train...
    with disable_adapters(model):          # exactly the base model
        base_logits = model(ids).logits
    save_adapters(model, "my_adapter.safetensors")
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from . import arch, core, registry, validate
from .paths import atomic_path

__all__ = ["BottleneckConfig", "BottleneckAdapter", "ResidualTap", "apply_adapters", "bottleneck_layers",
           "bottleneck_config", "disable_adapters", "remove_adapters", "bottleneck_state_dict",
           "load_bottleneck_state_dict", "save_adapters", "load_adapters", "bottleneck_params",
           "resolve_bottleneck_dim", "PLACEMENTS", "NONLINEARITIES", "INITS"]

#: placement → (sublayers that get an adapter, default nonlinearity, default scaling), as AdapterHub's
#: ``SeqBnConfig`` (Pfeiffer), ``DoubleSeqBnConfig`` (Houlsby) and ``ParBnConfig`` (parallel).
PLACEMENTS: dict[str, tuple[tuple[str, ...], str, float]] = {
    "pfeiffer": (("ffn",), "relu", 1.0),
    "houlsby": (("attn", "ffn"), "swish", 1.0),
    "parallel": (("ffn",), "relu", 4.0),
}

#: nonlinearity name → module. ``swish`` is SiLU (x·σ(x)); ``gelu`` the exact (erf) GELU; ``identity`` none.
NONLINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity,
}

INITS = ("zero", "bert", "houlsby")




@dataclass(frozen=True)
class BottleneckConfig:
    """The settings of bottleneck adapters (AdapterHub calls its config ``BnConfig``), checked when made:
    :func:`apply_adapters` builds one, :func:`bottleneck_config` returns it, :func:`save_adapters` writes it."""

    placement: str = "pfeiffer"
    bottleneck_dim: int = 48
    hidden_size: int = 768
    nonlinearity: str = "relu"
    init: str = "zero"
    scaling: float = 1.0

    def __post_init__(self):
        validate.require_str("placement", self.placement, choices=sorted(PLACEMENTS))
        validate.require_int("bottleneck_dim", self.bottleneck_dim, min=1)
        validate.require_int("hidden_size", self.hidden_size, min=1)
        validate.require_str("nonlinearity", self.nonlinearity, choices=sorted(NONLINEARITIES))
        validate.require_str("init", self.init, choices=INITS)
        scaling = validate.as_python_number(self.scaling)
        object.__setattr__(self, "scaling", float(validate.require_real("scaling", scaling, min=0, min_open=True)))

    @property
    def reduction_factor(self) -> float:
        """``d / m`` (03.1)."""
        return self.hidden_size / self.bottleneck_dim


def bottleneck_params(hidden_size: int, bottleneck_dim: int) -> int:
    """Equation (03.2): parameters of one adapter, ``2 m d + m + d``."""
    return 2 * bottleneck_dim * hidden_size + bottleneck_dim + hidden_size


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class BottleneckAdapter(core.AdapterLayer):
    """A frozen sublayer (``base_layer``: attention or MLP) plus a trainable bottleneck on its output.

    ``placement`` says what the bottleneck reads (equation 03.3), with ``y`` the sublayer's output:
    ``"houlsby"`` ``f(y)``, ``"pfeiffer"`` ``f(y + x₁)``, ``"parallel"`` ``f(x₁)``, where ``x₁`` is handed over
    by the block's :class:`ResidualTap`. The sublayer then returns ``s · f(·) + y``; the block adds
    its residual itself. A sublayer that returns a tuple (attention) has its first element changed.
    """

    adapter_modules = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, hidden_size: int, bottleneck_dim: int, nonlinearity: str = "relu",
                 placement: str = "houlsby", scaling: float = 1.0, init: str = "zero"):
        super().__init__()
        self.placement = validate.require_str("placement", placement, choices=sorted(PLACEMENTS))
        self.base_layer = base_layer
        self.hidden_size, self.bottleneck_dim = hidden_size, bottleneck_dim
        self.nonlinearity, self.scaling, self.init = nonlinearity, float(scaling), init
        ref = next(base_layer.parameters(), None)
        device = ref.device if ref is not None else None
        dtype = core.adapter_dtype(ref.dtype if ref is not None else torch.float32)
        self.adapter_down = nn.Sequential(nn.Linear(hidden_size, bottleneck_dim, device=device, dtype=dtype),
                                          NONLINEARITIES[nonlinearity]())
        self.adapter_up = nn.Linear(bottleneck_dim, hidden_size, device=device, dtype=dtype)
        self._residual: torch.Tensor | None = None
        self.reset_adapter_parameters(init)

    @torch.no_grad()
    def reset_adapter_parameters(self, init: str = "zero") -> None:
        """Equation (03.4). ``"zero"``: W_up = 0 and all biases 0 (W_down kaiming-uniform, a = √5), an exact
        identity; ``"bert"``: weights N(0, 0.02²), biases 0; ``"houlsby"``: weights N(0, 0.01²) truncated at
        ±0.02, biases 0 — AdapterHub's ``mam_adapter``, ``bert`` and ``houlsby``."""
        down, up = self.adapter_down[0], self.adapter_up
        validate.require_str("init", init, choices=INITS)
        if init == "zero":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init == "bert":
            down.weight.normal_(0.0, 0.02)
            up.weight.normal_(0.0, 0.02)
        elif init == "houlsby":
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)
        self.init = init

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """Equation (03.1) times the scaling: ``s · (W_up · act(W_down · h + b_down) + b_up)``."""
        return self.adapter_up(self.adapter_down(h)) * self.scaling

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        residual, self._residual = self._residual, None  # x₁ from the tap, used once
        if self.disabled:
            return out
        y = out[0] if isinstance(out, tuple) else out
        if self.placement == "houlsby":
            h = y
        else:
            if residual is None:
                raise RuntimeError(f"the {self.placement} adapter did not receive x₁: its ResidualTap "
                                   "did not run (was the block's norm replaced after apply_adapters?)")
            h = y + residual if self.placement == "pfeiffer" else residual
        dtype = y.dtype
        new = (self.bottleneck(h.to(self.adapter_up.weight.dtype)) + y).to(dtype)  # (03.3): (s·f(h) + y)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    def extra_repr(self) -> str:
        return (f"placement={self.placement!r}, hidden_size={self.hidden_size}, bottleneck_dim={self.bottleneck_dim}, "
                f"nonlinearity={self.nonlinearity!r}, scaling={self.scaling:g}")


class ResidualTap(nn.Module):
    """Wraps the norm before the feed-forward sublayer; hands its input ``x₁`` to the block's adapter."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["adapter"] = adapter  # a reference, not a submodule: no second copy in state_dict

    def forward(self, x, *args, **kwargs):
        self.adapter._residual = x
        return self.base_layer(x, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Whole-model operations
# ----------------------------------------------------------------------------------------------------------

def resolve_bottleneck_dim(hidden_size: int, reduction_factor=16, bottleneck_dim=None) -> int:
    """``m`` from ``bottleneck_dim`` if given, else ``d / reduction_factor``, which must be a whole number."""
    if bottleneck_dim is not None:
        return validate.require_int("bottleneck_dim", bottleneck_dim, min=1)
    reduction_factor = validate.require_real("reduction_factor", reduction_factor, min=0, min_open=True)
    m = hidden_size / reduction_factor
    if m < 1 or m != int(m):
        divisors = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if hidden_size % k == 0]
        raise ValueError(f"reduction_factor must divide the width d = {hidden_size} into a whole number ≥ 1, got "
                         f"{reduction_factor:g} (d / reduction_factor = {m:g}). Use one of {divisors}, or pass "
                         "bottleneck_dim=m directly")
    return int(m)


_LAYERS = core.LayerMethod("bottleneck", BottleneckAdapter, "bottleneck adapter", "adapters",
                           companions=(ResidualTap,))


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    """``(name, layer)`` for every :class:`BottleneckAdapter` in ``model``, in module order."""
    return iter(_LAYERS.layers(model))


def apply_adapters(model: nn.Module, placement: str = "pfeiffer", reduction_factor: float = 16,
                   bottleneck_dim: int | None = None, nonlinearity: str | None = None, init: str = "zero",
                   scaling: float | None = None, *, config: BottleneckConfig | None = None) -> nn.Module:
    """Add a bottleneck adapter to every block of ``model`` (in place), freeze the rest; return ``model``.

    ``placement``: ``"pfeiffer"`` (after the MLP), ``"houlsby"`` (after attention and after the MLP) or
    ``"parallel"`` (beside the MLP), equation (03.3). The bottleneck has ``m = bottleneck_dim`` units, or
    ``d / reduction_factor`` (AdapterHub's default 16 gives 48 on GPT-2 small). ``nonlinearity=None`` takes
    AdapterHub's default for the placement (relu; swish for houlsby); ``scaling=None`` likewise (1; 4 for
    parallel). ``init="zero"`` starts as the exact base model (03.4). The keywords build a
    :class:`BottleneckConfig` (or pass ``config=``, whose ``hidden_size`` must be the model's width).
    """
    validate.require_module("model", model)
    layout, d = arch.layout(model), arch.width(model)
    if config is None:
        sublayers, default_act, default_scaling = PLACEMENTS[
            validate.require_str("placement", placement, choices=sorted(PLACEMENTS))]
        config = BottleneckConfig(placement, resolve_bottleneck_dim(d, reduction_factor, bottleneck_dim), d,
                                  default_act if nonlinearity is None else nonlinearity, init,
                                  default_scaling if scaling is None else scaling)
    elif not isinstance(config, BottleneckConfig):
        raise TypeError(f"config must be a BottleneckConfig, got {validate.describe(config)}")
    elif config.hidden_size != d:
        raise ValueError(f"config.hidden_size = {config.hidden_size}, but this model has width {d}: adapters "
                         "made for one width do not fit another")
    registry.require_no_method(model, "bottleneck adapters")
    c = config
    wrapped = []
    for i, _ in enumerate(model.get_submodule(layout.blocks)):
        block = f"{layout.blocks}.{i}"
        for which in PLACEMENTS[c.placement][0]:
            name = f"{block}.{getattr(layout, which)}"
            layer = BottleneckAdapter(model.get_submodule(name), d, c.bottleneck_dim, c.nonlinearity, c.placement,
                                      c.scaling, c.init)
            wrapped.append((name, layer))
            if c.placement != "houlsby":  # the adapter also needs x₁, the input of the MLP's norm
                norm = f"{block}.{layout.ffn_norm}"
                wrapped.append((norm, ResidualTap(model.get_submodule(norm), layer)))
    return _LAYERS.install(model, wrapped, config)


def bottleneck_config(model: nn.Module) -> BottleneckConfig:
    """The :class:`BottleneckConfig` recorded by :func:`apply_adapters`."""
    config = _LAYERS.recorded_config(model)
    if config is None:
        raise ValueError("these adapters were not placed by apply_adapters; their settings are unknown")
    return config


def disable_adapters(model: nn.Module):
    """Context manager: inside it every adapter is skipped, so the model is *exactly* the base model."""
    return _LAYERS.disable(model)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original sublayers and norms back (the very same modules: the base is restored bit for bit).
    Base parameters stay frozen (``requires_grad=False``), as after ``remove_lora``."""
    return _LAYERS.remove(model, merge=None)


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, e.g. ``transformer.h.0.mlp.adapter_down.0.weight`` (detached, shared storage)."""
    return _LAYERS.state_dict(model)


def load_bottleneck_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy adapter weights (keys as in :func:`bottleneck_state_dict`) into ``model``; strict, all or nothing."""
    return _LAYERS.load_state_dict(model, state_dict)


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter weights to one safetensors file; the settings go into its metadata."""
    from safetensors.torch import save_file
    path = validate.require_path("path", path)
    tensors = {k: t.contiguous() for k, t in bottleneck_state_dict(model).items()}
    meta = {"peft_lab_adapters": json.dumps(asdict(bottleneck_config(model)))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Read a file written by :func:`save_adapters` into ``model``: a model without adapters gets them with
    the file's settings; a model that has adapters must have the file's settings (else ``ValueError`` naming
    the differences). A failed call leaves the model as it came (:func:`peft_lab.core.rollback_on_error`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    validate.require_module("model", model)
    path = validate.require_path("path", path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not an existing file; expected a .safetensors file "
                                "written by save_adapters")
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("peft_lab_adapters")
    if meta is None:
        raise ValueError(f"path={str(path)!r} was not written by save_adapters (its metadata has no adapter "
                         "settings); for AdapterHub's folders use peft_lab.import_adapterhub_adapter")
    config = BottleneckConfig(**json.loads(meta))
    if arch.width(model) != config.hidden_size:
        raise ValueError(f"the file was saved from a model of width {config.hidden_size}, this model has width "
                         f"{arch.width(model)}: load it into the architecture it was trained on")
    if any(True for _ in bottleneck_layers(model)):
        here = asdict(bottleneck_config(model))
        differ = {k: (val, here[k]) for k, val in asdict(config).items()
                  if here[k] != val and k != "init"}  # init matters only before weights are loaded
        if differ:
            listed = ", ".join(f"{k}: file {a!r}, model {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"the file's adapter settings differ from this model's adapters ({listed}); the "
                             "weights would compute another function. Load into a model without adapters (they "
                             "are then applied with the file's settings), or call remove_adapters(model) first")
    with core.rollback_on_error(model):
        if not any(True for _ in bottleneck_layers(model)):
            apply_adapters(model, config=config)
        load_bottleneck_state_dict(model, load_file(str(path)))
    return model


# ----------------------------------------------------------------------------------------------------------
# The registry entry (PEFT has no bottleneck adapters: AdapterHub's format is in peft_lab.interop_adapterhub)
# ----------------------------------------------------------------------------------------------------------

_LAYERS.register(
    label="bottleneck adapters", config_class=BottleneckConfig,
    apply=lambda model, config: apply_adapters(model, config=config),
    disable=disable_adapters, remove=remove_adapters, state_dict=bottleneck_state_dict,
    load_state_dict=load_bottleneck_state_dict, config_of=bottleneck_config,
    # A bottleneck keeps its input (d) and what its nonlinearity saves: m for ReLU (its output, also W_up's
    # input), 2m for SiLU (input and output).
    memory={
        # Houlsby: SiLU adapters after attention (stage 4) and after the MLP, the lowest at stage 4
        "houlsby": registry.MethodShape(lowest=registry.STAGES["attn_adapter"],
                                        after_attention=lambda d, m: d + 2 * m,
                                        after_ffn=lambda d, m, layer: d + 2 * m, required=("bottleneck_dim",)),
        # Pfeiffer: one ReLU adapter after the MLP, fed z = y + x₁ (a new tensor, d)
        "pfeiffer": registry.MethodShape(lowest=registry.STAGES["ffn_adapter"], after_ffn=lambda d, m, layer: d + m,
                                         required=("bottleneck_dim",)),
        # parallel: one ReLU adapter beside the MLP, fed x₁, the MLP norm's input. Above the first block that
        # norm keeps x₁ already (the same storage); in the first block nothing else does.
        "parallel": registry.MethodShape(lowest=registry.STAGES["ffn_adapter"],
                                         after_ffn=lambda d, m, layer: m + (d if layer == 0 else 0),
                                         required=("bottleneck_dim",)),
    },
    memory_spec=lambda c, model_config: {"kind": c.placement, "bottleneck_dim": c.bottleneck_dim},
)
