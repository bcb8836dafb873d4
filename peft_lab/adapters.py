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

* (03.4) init ``"zeros"``: ``W_up = 0, b_up = 0`` (``W_down`` kaiming-uniform, ``b_down = 0``), so ``f ≡ 0`` and the
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
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from numbers import Real
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from . import core
from .arch import LAYOUTS, Layout

__all__ = ["AdapterConfig", "BottleneckAdapter", "ResidualTap", "apply_adapters", "adapter_layers",
           "adapter_config", "disable_adapters", "remove_adapters", "adapters_state_dict",
           "load_adapters_state_dict", "save_adapters", "load_adapters", "bottleneck_params",
           "PLACEMENTS", "NONLINEARITIES", "INITS", "ARCHITECTURES"]

_METHOD = "adapters"

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

INITS = ("zeros", "bert", "houlsby")


#: Where the pieces of a pre-LN block live (:class:`peft_lab.arch.Layout`), per ``model.config.model_type``:
#: the one table of block layouts in :mod:`peft_lab.arch`, under the names this module has always used.
Arch = Layout
ARCHITECTURES: dict[str, Arch] = LAYOUTS


@dataclass(frozen=True)
class AdapterConfig:
    """The settings :func:`apply_adapters` used (read back with :func:`adapter_config`)."""

    placement: str = "pfeiffer"
    bottleneck_dim: int = 48
    hidden_size: int = 768
    nonlinearity: str = "relu"
    init: str = "zeros"
    scaling: float = 1.0

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

    ``mode`` says what the bottleneck reads (equation 03.3), with ``y`` the sublayer's output:
    ``"sequential"`` (Houlsby) ``f(y)``, ``"pfeiffer"`` ``f(y + x₁)``, ``"parallel"`` ``f(x₁)``, where ``x₁`` is
    handed over by the block's :class:`ResidualTap`. The sublayer then returns ``s · f(·) + y``; the block adds
    its residual itself. A sublayer that returns a tuple (attention) has its first element changed.
    """

    adapter_modules = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module, hidden_size: int, bottleneck_dim: int, nonlinearity: str = "relu",
                 mode: str = "sequential", scaling: float = 1.0, init: str = "zeros"):
        super().__init__()
        if mode not in ("sequential", "pfeiffer", "parallel"):
            raise ValueError(f"mode must be 'sequential', 'pfeiffer' or 'parallel', got {mode!r}")
        self.base_layer = base_layer
        self.hidden_size, self.bottleneck_dim = hidden_size, bottleneck_dim
        self.nonlinearity, self.mode, self.scaling, self.init = nonlinearity, mode, float(scaling), init
        ref = next(base_layer.parameters(), None)
        device = ref.device if ref is not None else None
        # half-precision bases get float32 adapters (as peft_lab.lora does)
        dtype = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        self.adapter_down = nn.Sequential(nn.Linear(hidden_size, bottleneck_dim, device=device, dtype=dtype),
                                          NONLINEARITIES[nonlinearity]())
        self.adapter_up = nn.Linear(bottleneck_dim, hidden_size, device=device, dtype=dtype)
        self._residual: torch.Tensor | None = None
        self.reset_adapter_parameters(init)

    @torch.no_grad()
    def reset_adapter_parameters(self, init: str = "zeros") -> None:
        """Equation (03.4). ``"zeros"``: W_up = 0 and all biases 0 (W_down kaiming-uniform, a = √5), an exact
        identity; ``"bert"``: weights N(0, 0.02²), biases 0; ``"houlsby"``: weights N(0, 0.01²) truncated at
        ±0.02, biases 0 — AdapterHub's ``mam_adapter``, ``bert`` and ``houlsby``."""
        down, up = self.adapter_down[0], self.adapter_up
        if init == "zeros":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init == "bert":
            down.weight.normal_(0.0, 0.02)
            up.weight.normal_(0.0, 0.02)
        elif init == "houlsby":
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
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
        if self.mode == "sequential":
            h = y
        else:
            if residual is None:
                raise RuntimeError(f"the {self.mode} adapter did not receive x₁: its ResidualTap did not run "
                                   "(was the block's norm replaced after apply_adapters?)")
            h = y + residual if self.mode == "pfeiffer" else residual
        dtype = y.dtype
        new = (self.bottleneck(h.to(self.adapter_up.weight.dtype)) + y).to(dtype)  # (03.3): (s·f(h) + y)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, hidden_size={self.hidden_size}, bottleneck_dim={self.bottleneck_dim}, "
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

def _fail(argument: str, value, expected: str, fix: str, error=ValueError):
    raise error(f"{argument}={value!r}: expected {expected}. {fix}")


def _check_number(argument: str, value, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(argument, value, "a number", f"Pass {argument} as an int or float.", TypeError)
    if not math.isfinite(value) or (positive and value <= 0):
        _fail(argument, value, "a positive finite number", f"Pass {argument} > 0.")


def hidden_size_of(model: nn.Module) -> int:
    """The model width ``d`` from its config (``hidden_size``; GPT-2's ``n_embd``)."""
    config = getattr(model, "config", None)
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(d, int):
        raise ValueError("cannot read the model width: model.config has no hidden_size/n_embd; adapters here "
                         "need a transformers model")
    return d


def _arch(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model type {model_type!r}: expected one of {sorted(ARCHITECTURES)}. Adapters are placed "
                         "by the block layout of those architectures; add an Arch entry to "
                         "peft_lab.adapters.ARCHITECTURES for another one.")
    return ARCHITECTURES[model_type]


def resolve_bottleneck_dim(hidden_size: int, reduction_factor=16, bottleneck_dim=None) -> int:
    """``m`` from ``bottleneck_dim`` if given, else ``d / reduction_factor``, which must be a whole number."""
    if bottleneck_dim is not None:
        if isinstance(bottleneck_dim, bool) or not isinstance(bottleneck_dim, int):
            _fail("bottleneck_dim", bottleneck_dim, "a positive int (the bottleneck size m)",
                  "Pass an int, or leave it None to use reduction_factor.", TypeError)
        if bottleneck_dim <= 0:
            _fail("bottleneck_dim", bottleneck_dim, "a positive int (m ≥ 1)", "Pass bottleneck_dim ≥ 1.")
        return bottleneck_dim
    _check_number("reduction_factor", reduction_factor)
    m = hidden_size / reduction_factor
    if m < 1 or m != int(m):
        divisors = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if hidden_size % k == 0]
        _fail("reduction_factor", reduction_factor,
              f"a factor that divides the width d = {hidden_size} (d / reduction_factor = {m:g} is not a whole "
              "number ≥ 1)", f"Use one of {divisors}, or pass bottleneck_dim=m directly.")
    return int(m)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    """``(name, layer)`` for every :class:`BottleneckAdapter` in ``model``, in module order."""
    return core.find_layers(model, BottleneckAdapter)


def _require_adapters(model: nn.Module) -> list[tuple[str, BottleneckAdapter]]:
    return core.require_layers(model, BottleneckAdapter, "bottleneck adapter", "apply_adapters(model, ...)")


def apply_adapters(model: nn.Module, placement: str = "pfeiffer", reduction_factor: float = 16,
                   bottleneck_dim: int | None = None, nonlinearity: str | None = None, init: str = "zeros",
                   scaling: float | None = None) -> nn.Module:
    """Add a bottleneck adapter to every block of ``model`` (in place), freeze the rest; return ``model``.

    ``placement``: ``"pfeiffer"`` (after the MLP), ``"houlsby"`` (after attention and after the MLP) or
    ``"parallel"`` (beside the MLP), equation (03.3). The bottleneck has ``m = bottleneck_dim`` units, or
    ``d / reduction_factor`` (AdapterHub's default 16 gives 48 on GPT-2 small). ``nonlinearity=None`` takes
    AdapterHub's default for the placement (relu; swish for houlsby); ``scaling=None`` likewise (1; 4 for
    parallel). ``init="zeros"`` starts as the exact base model (03.4).

    Raises ``ValueError`` for an unknown placement, nonlinearity, init or architecture, a reduction factor
    that does not divide the width, ``bottleneck_dim ≤ 0``, a model that already has adapters or another
    method's layers (LoRA), and ``TypeError`` for arguments of the wrong type.
    """
    if not isinstance(model, nn.Module):
        _fail("model", type(model).__name__, "a torch.nn.Module (a transformers model)",
              "Load one with peft_lab.load_base_model or build_from_config.", TypeError)
    if placement not in PLACEMENTS:
        _fail("placement", placement, f"one of {sorted(PLACEMENTS)}", "Pick one of those names.")
    sublayers, default_act, default_scaling = PLACEMENTS[placement]
    nonlinearity = default_act if nonlinearity is None else nonlinearity
    if not isinstance(nonlinearity, str) or nonlinearity.lower() not in NONLINEARITIES:
        _fail("nonlinearity", nonlinearity, f"one of {sorted(NONLINEARITIES)} or None (the placement's default)",
              "Pick one of those names.")
    nonlinearity = nonlinearity.lower()
    if init not in INITS:
        _fail("init", init, f"one of {list(INITS)}", '"zeros" starts as the exact base model.')
    scaling = default_scaling if scaling is None else scaling
    _check_number("scaling", scaling)
    arch = _arch(model)
    d = hidden_size_of(model)
    m = resolve_bottleneck_dim(d, reduction_factor, bottleneck_dim)
    if any(True for _ in adapter_layers(model)):
        raise ValueError("this model already has bottleneck adapters; applying them twice is not supported. "
                         "Call remove_adapters(model) first, or use a fresh copy of the base model.")
    others = sorted({type(layer).__name__ for _, layer in core.find_layers(model, core.AdapterLayer)})
    if others:
        raise ValueError(f"this model already has {others} layers (another PEFT method, e.g. LoRA); adapters on "
                         "top of it are not supported here. Remove that method first (e.g. remove_lora(model)).")
    blocks = model.get_submodule(arch.blocks)
    core.freeze(model)
    mode = {"houlsby": "sequential", "pfeiffer": "pfeiffer", "parallel": "parallel"}[placement]
    for i, _ in enumerate(blocks):
        prefix = f"{arch.blocks}.{i}"
        for which in sublayers:
            name = f"{prefix}.{getattr(arch, which)}"
            layer = BottleneckAdapter(model.get_submodule(name), d, m, nonlinearity, mode, scaling, init)
            core.replace_module(model, name, layer)
            if mode != "sequential":
                norm = f"{prefix}.{arch.ffn_norm}"
                core.replace_module(model, norm, ResidualTap(model.get_submodule(norm), layer))
    core.record_config(model, _METHOD, AdapterConfig(placement, m, d, nonlinearity, init, float(scaling)))
    return model


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The :class:`AdapterConfig` recorded by :func:`apply_adapters`."""
    _require_adapters(model)
    config = core.get_config(model, _METHOD)
    if config is None:
        raise ValueError("these adapters were not placed by apply_adapters; their settings are unknown")
    return config


@contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: inside it every adapter is skipped, so the model is *exactly* the base model."""
    with core.disabled(layer for _, layer in _require_adapters(model)):
        yield model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original sublayers and norms back (the very same modules: the base is restored bit for bit)."""
    _require_adapters(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (BottleneckAdapter, ResidualTap)):
            core.replace_module(model, name, module.base_layer)
    core.clear_config(model, _METHOD)
    return model


def adapters_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, e.g. ``transformer.h.0.mlp.adapter_down.0.weight`` (detached, shared storage)."""
    return core.adapter_state_dict(_require_adapters(model))


def load_adapters_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy adapter weights (keys as in :func:`adapters_state_dict`) into ``model``; strict, all or nothing."""
    core.load_adapter_state_dict(adapters_state_dict(model), state_dict, what="adapter")
    return model


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place with ``os.replace``: no half-written files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter weights to one safetensors file; the settings go into its metadata."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in adapters_state_dict(model).items()}
    meta = {"peft_lab_adapters": json.dumps(asdict(adapter_config(model)))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Read a file written by :func:`save_adapters`: apply adapters with its settings (if the model has none
    yet) and load the weights. A file that does not fit leaves the model as it came."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        _fail("path", str(path), "an existing .safetensors file written by save_adapters", "Check the path.",
              FileNotFoundError)
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("peft_lab_adapters")
    if meta is None:
        _fail("path", str(path), "a file written by save_adapters (its metadata has the adapter settings)",
              "For AdapterHub's files use peft_lab.interop_adapterhub.import_adapterhub_adapter.")
    config = AdapterConfig(**json.loads(meta))
    added = not any(True for _ in adapter_layers(model))
    if added:
        if hidden_size_of(model) != config.hidden_size:
            _fail("model", f"width {hidden_size_of(model)}", f"width {config.hidden_size} (the file's)",
                  "Load it into the architecture it was trained on.")
        apply_adapters(model, config.placement, bottleneck_dim=config.bottleneck_dim,
                       nonlinearity=config.nonlinearity, init=config.init, scaling=config.scaling)
    try:
        load_adapters_state_dict(model, load_file(str(path)))
    except Exception:
        if added:
            remove_adapters(model)
        raise
    return model
