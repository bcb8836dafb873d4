"""IA3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
is Better and Cheaper than In-Context Learning", §3.3), notebook 05.

The equations of notebook 05 ("IA3"), for a layer ``h = W x + b`` with ``W: d_out × d_in`` (``nn.Linear``'s
layout; GPT-2's ``Conv1D`` stores ``Wᵀ``):

* (05.1) a target that is not feed-forward scales its *output*: ``h = l ⊙ (W x + b)``, ``l ∈ ℝ^d_out``
  (keys and values in the paper; on GPT-2 the fused ``c_attn`` scales queries too);
* (05.2) a feed-forward target scales its *input*: ``h = W (l ⊙ x) + b``, ``l ∈ ℝ^d_in`` (the paper rescales
  the activation inside the MLP, which is the input of its second projection);
* (05.3) initialisation ``l = 1``, so ``h = W x + b`` at step 0 — bit for bit, since ``1 · y = y`` in floats;
* (05.4) merge. ``l ⊙ (W x) = diag(l) W x``, so (05.1) is the layer with ``W' = diag(l) W``, ``b' = l ⊙ b``:
  row ``i`` of ``W`` (output feature ``i``) is multiplied by ``l_i``. ``W (l ⊙ x) = W diag(l) x``, so (05.2) is
  ``W' = W diag(l)``, ``b' = b``: column ``j`` (input feature ``j``) is multiplied by ``l_j``. In ``Conv1D``'s
  ``d_in × d_out`` layout rows and columns swap. Unmerge divides by ``l`` (refused where an entry is 0);
* (05.5) what it can express: ``ΔW = W' − W = diag(l − 1) W`` (or ``W diag(l − 1)``) — each output (input)
  feature's weights scaled as a whole, never rotated or mixed; ``d_out`` (``d_in``) numbers per layer;
* (05.6) trainable parameters: ``Σ d_out`` over the output-scaled targets + ``Σ d_in`` over the feed-forward
  ones. GPT-2 small, defaults: ``12 · (3·768 + 3072) = 64,512``.

Layout is PEFT's, so files copy one to one: the vector is ``ia3_l``, shaped ``(d_out, 1)`` for (05.1) and
``(1, d_in)`` for (05.2); the wrapped layer is ``base_layer``. Defaults per architecture are PEFT's
(:data:`peft_lab.arch.DEFAULT_TARGETS` rows ``"ia3"`` and ``"ia3_feedforward"``).

Typical use::

    model = apply_ia3(model)              # GPT-2: c_attn output, mlp.c_proj input; only the vectors train
    ...train...
    with disable_ia3(model):              # exactly the base model
        ...
    merge_ia3(model)                      # W ← diag(l) W or W diag(l): no cost at inference
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import arch, core, registry, validate
from .arch import DEFAULT_TARGETS
from .core import AdapterLayer

__all__ = ["IA3Config", "IA3Layer", "apply_ia3", "ia3_config", "ia3_layers", "merge_ia3", "unmerge_ia3",
           "disable_ia3", "remove_ia3", "ia3_state_dict", "load_ia3_state_dict", "is_feedforward",
           "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class IA3Config:
    """IA3's settings, checked when made; :func:`apply_ia3` builds one from its keywords, :func:`ia3_config`
    returns the one applied, the PEFT export writes it. Each of ``target_modules`` and ``feedforward_modules``
    is a tuple of names, one regular expression, or ``None`` for the architecture's default (PEFT's tables,
    :data:`peft_lab.arch.DEFAULT_TARGETS`); a listed ``feedforward_modules`` must be a subset of a listed
    ``target_modules`` (PEFT's rule); ``[]`` scales every target's output."""

    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None

    def __post_init__(self):
        targets, ff = self.target_modules, self.feedforward_modules
        if targets is not None:
            targets = core.module_names(targets, "target_modules")
        if ff is not None:
            ff = core.module_names(ff, "feedforward_modules", allow_empty=True)
        if isinstance(ff, tuple) and isinstance(targets, tuple):
            # PEFT's rule, "a subset of target_modules", read with the suffix rule: the default feed-forward
            # name "mlp.c_proj" lies inside a target "c_proj" (PEFT fills its default in the same way)
            outside = [f for f in ff if not core.matches_target(f, targets)]
            if outside:
                raise ValueError(f"feedforward_modules must be a subset of target_modules (PEFT's rule): "
                                 f"{outside} is not in target_modules {list(targets)}")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "feedforward_modules", ff)


def is_feedforward(name: str, feedforward_modules: Sequence[str] | str) -> bool:
    """Whether the target called ``name`` is scaled on its input (05.2) — PEFT's rule
    (:func:`peft_lab.core.ends_with_module`); ``feedforward_modules`` must be a subset of ``target_modules``,
    so in practice it agrees with :func:`peft_lab.core.matches_target`."""
    return core.ends_with_module(name, feedforward_modules)


class IA3Layer(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (05.1) or, for a feed-forward module, input (05.2) is
    multiplied element-wise by the trainable vector ``ia3_l`` (initialised to ones, 05.3).

    Attributes: ``in_features``, ``out_features``, ``is_feedforward``, ``fan_in_fan_out`` (True for ``Conv1D``),
    ``merged``, ``disabled``.
    """

    merged_fix = "unmerge_ia3(model)"

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The vector, under PEFT's key ``ia3_l``."""
        return {"ia3_l": self.ia3_l}

    def __init__(self, base_layer: nn.Module, is_feedforward: bool = False):
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(f"base_layer must be an nn.Linear or transformers' Conv1D (what IA3Layer wraps), "
                            f"got {validate.describe(base_layer)}")
        self.is_feedforward = validate.require_bool("is_feedforward", is_feedforward)
        weight = base_layer.weight
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        d_in, d_out = (weight.shape if self.fan_in_fan_out else weight.shape[::-1])
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.base_layer = base_layer
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)  # PEFT's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=core.adapter_dtype(weight.dtype)))

    def _vector_in_weight_layout(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the stored weight (05.4): ``(d_out, 1)`` scales rows of ``d_out × d_in``
        and ``(1, d_in)`` its columns; ``Conv1D``'s ``d_in × d_out`` needs the transpose."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        """Equation (05.4): ``W ← diag(l) W, b ← l ⊙ b`` (output side) or ``W ← W diag(l)`` (input side)."""
        if self.merged:
            return
        w, bias = core.stored_weight(self.base_layer), self.base_layer.bias
        w.mul_(self._vector_in_weight_layout().to(w.dtype))
        if not self.is_feedforward and bias is not None:
            bias.mul_(self.ia3_l.flatten().to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` by dividing by ``l`` (equal to the old weight up to float rounding). Refused when
        an entry of ``l`` is 0: the merge erased those weights, and nothing can bring them back."""
        if not self.merged:
            return
        if not torch.all(self.ia3_l != 0):
            raise ValueError("cannot unmerge an IA3 layer whose vector ia3_l has an entry 0: the merge set those "
                             "weights to 0 and dividing cannot restore them; remove_ia3(model, merge=True) keeps "
                             "the merged model, or reload the base")
        w, bias = self.base_layer.weight, self.base_layer.bias
        w.div_(self._vector_in_weight_layout().to(w.dtype))
        if not self.is_feedforward and bias is not None:
            bias.div_(self.ia3_l.flatten().to(bias.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:  # (05.2): the vector acts before the weight
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)  # (05.1)

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, size={self.ia3_l.numel()}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------------------
# Whole-model operations (written once in core.LayerMethod)
# ----------------------------------------------------------------------------------------------------------

_LAYERS = core.LayerMethod("ia3", IA3Layer, "IA3", "ia3", SUPPORTED_LAYERS)


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Layer]]:
    """``(name, layer)`` for every :class:`IA3Layer` in ``model``, in module order."""
    return iter(_LAYERS.layers(model))


def _default_feedforward(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS["ia3_feedforward"]:
        raise ValueError(f"no default feedforward_modules for model type {model_type!r}; pass "
                         "feedforward_modules=[...] (the targets whose input IA3 scales), or [] for none")
    return tuple(DEFAULT_TARGETS["ia3_feedforward"][model_type])


def apply_ia3(model: nn.Module, target_modules: Sequence[str] | str | None = None,
              feedforward_modules: Sequence[str] | str | None = None, *, config: IA3Config | None = None
              ) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`IA3Layer`, freeze everything else; return ``model``.

    ``target_modules=None`` takes the architecture's default (GPT-2 ``["c_attn", "mlp.c_proj"]``, LLaMA
    ``["k_proj", "v_proj", "down_proj"]``); matching follows :func:`peft_lab.core.matches_target`.
    ``feedforward_modules=None`` takes the default feed-forward set (GPT-2 ``["mlp.c_proj"]``, LLaMA
    ``["down_proj"]``), even when ``target_modules`` is given, as PEFT does; ``[]`` scales every target's
    output. Which targets are feed-forward follows :func:`is_feedforward`. The keywords build an
    :class:`IA3Config` (or pass ``config=``). Changed in place; a failed call leaves the model unchanged.
    Afterwards only the ``ia3_l`` vectors have ``requires_grad=True`` (05.6).
    """
    validate.require_module("model", model)
    if config is None:
        config = IA3Config(target_modules, feedforward_modules)
    elif not isinstance(config, IA3Config):
        raise TypeError(f"config must be an IA3Config, got {validate.describe(config)}")
    registry.require_no_method(model, "IA3")
    targets, matched = _LAYERS.match_targets(model, config.target_modules, DEFAULT_TARGETS["ia3"])
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = _default_feedforward(model)
    config = IA3Config(targets, feedforward)  # checks the subset rule against the resolved targets
    wrapped = [(name, IA3Layer(module, is_feedforward(name, feedforward))) for name, module in matched]
    return _LAYERS.install(model, wrapped, config)


def ia3_config(model: nn.Module) -> IA3Config:
    """The :class:`IA3Config` that :func:`apply_ia3` recorded on ``model`` (or one naming the layers exactly,
    for layers placed by hand)."""
    config = _LAYERS.recorded_config(model)
    if config is None:
        layers = _LAYERS.layers(model)
        config = IA3Config(tuple(n for n, _ in layers), tuple(n for n, layer in layers if layer.is_feedforward))
    return config


def disable_ia3(model: nn.Module):
    """Context manager: inside it the model computes the base model alone (exactly for unmerged layers; merged
    ones are unmerged on entry and merged on exit)."""
    return _LAYERS.disable(model)


def remove_ia3(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain layers back. ``merge=True`` keeps the learned scaling inside ``W`` (05.4); ``merge=False``
    drops it (the base model again, up to rounding if it was merged)."""
    return _LAYERS.remove(model, validate.require_bool("merge", merge))


def merge_ia3(model: nn.Module) -> nn.Module:
    """Equation (05.4) in every IA3 layer. Outputs stay equal up to float rounding."""
    return _LAYERS.merge(model)


def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_ia3` (divide by ``l``; restores ``W`` up to float rounding)."""
    return _LAYERS.unmerge(model)


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the IA3 vectors: ``{"<layer>.ia3_l": l, ...}`` — PEFT's file keys without ``base_model.model.``.
    Detached and sharing storage, like ``state_dict``."""
    return _LAYERS.state_dict(model)


def load_ia3_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy IA3 vectors (keys as in :func:`ia3_state_dict`) into ``model``; strict, all or nothing
    (:func:`peft_lab.core.load_adapter_state_dict`). Merged layers are refused (unmerge first)."""
    return _LAYERS.load_state_dict(model, state_dict)


# ----------------------------------------------------------------------------------------------------------
# PEFT's file format and the registry entry
# ----------------------------------------------------------------------------------------------------------

def _as_json(names):
    return names if isinstance(names, str) else list(names)


def _to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's ``IA3Config`` fields and the vectors (keys without PEFT's prefix)."""
    layers = [layer for _, layer in ia3_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the IA3 layers are merged into W; call unmerge_ia3(model) before exporting, "
                         "otherwise PEFT would scale the weights a second time")
    config = ia3_config(model)
    fields = {"target_modules": _as_json(config.target_modules),
              "feedforward_modules": _as_json(config.feedforward_modules),
              "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
              "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}
    return fields, ia3_state_dict(model)


def _from_peft(model: nn.Module, fields: dict) -> nn.Module:
    """Apply IA3 as PEFT's ``IA3Config`` fields say (the vectors are loaded after)."""
    for name in ("modules_to_save", "exclude_modules"):
        if fields.get(name):
            raise ValueError(f"this IA3 adapter uses {name}={fields[name]!r}, which peft_lab.ia3 does not implement")
    if "target_modules" not in fields:
        raise ValueError("the adapter's config lacks the IA3 field 'target_modules'")
    return apply_ia3(model, fields["target_modules"], fields.get("feedforward_modules"))


_LAYERS.register(
    config_class=IA3Config,
    apply=lambda model, config: apply_ia3(model, config=config),
    disable=disable_ia3,
    remove=remove_ia3,
    state_dict=ia3_state_dict,
    load_state_dict=load_ia3_state_dict,
    config_of=ia3_config,
    serve=merge_ia3,
    served_as="merged",
    peft_type="IA3",
    to_peft=_to_peft,
    from_peft=_from_peft,
    # its product l ⊙ y keeps y, a new tensor — the unscaled output (d_out) of a target, the unscaled input
    # (d_in) of a feed-forward target; the lowest trainable parameter is the lowest wrapped layer
    memory={"ia3": registry.MethodShape(lowest=None, required=("targets", "feedforward"))},
    memory_spec=lambda c, model_config: {
        "kind": "ia3",
        "targets": arch.default_targets(model_config, "ia3") if c.target_modules is None else c.target_modules,
        "feedforward": (arch.default_targets(model_config, "ia3_feedforward") if c.feedforward_modules is None
                        else c.feedforward_modules)},
)
