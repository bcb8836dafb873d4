"""IA3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
is Better and Cheaper than In-Context Learning", §3.3), notebook 06.

The equations of notebook 06 ("IA3"), for a layer ``h = W x + b`` with ``W: d_out × d_in`` (``nn.Linear``'s
layout; GPT-2's ``Conv1D`` stores ``Wᵀ``):

* (06.1) a target that is not feed-forward scales its *output*: ``h = l ⊙ (W x + b)``, ``l ∈ ℝ^d_out``
  (keys and values in the paper; on GPT-2 the fused ``c_attn`` scales queries too);
* (06.2) a feed-forward target scales its *input*: ``h = W (l ⊙ x) + b``, ``l ∈ ℝ^d_in`` (the paper rescales
  the activation inside the MLP, which is the input of its second projection);
* (06.3) initialisation ``l = 1``, so ``h = W x + b`` at step 0 — bit for bit, since ``1 · y = y`` in floats;
* (06.4) merge. ``l ⊙ (W x) = diag(l) W x``, so (06.1) is the layer with ``W' = diag(l) W``, ``b' = l ⊙ b``:
  row ``i`` of ``W`` (output feature ``i``) is multiplied by ``l_i``. ``W (l ⊙ x) = W diag(l) x``, so (06.2) is
  ``W' = W diag(l)``, ``b' = b``: column ``j`` (input feature ``j``) is multiplied by ``l_j``. In ``Conv1D``'s
  ``d_in × d_out`` layout rows and columns swap. Unmerge divides by ``l`` (refused where an entry is 0);
* (06.5) what it can express: ``ΔW = W' − W = diag(l − 1) W`` (or ``W diag(l − 1)``) — each output (input)
  feature's weights scaled as a whole, never rotated or mixed; ``d_out`` (``d_in``) numbers per layer;
* (06.6) trainable parameters: ``Σ d_out`` over the output-scaled targets + ``Σ d_in`` over the feed-forward
  ones. GPT-2 small, defaults: ``12 · (3·768 + 3072) = 64,512``.

Layout is PEFT's, so files copy one to one: the vector is ``ia3_l``, shaped ``(d_out, 1)`` for (06.1) and
``(1, d_in)`` for (06.2); the wrapped layer is ``base_layer``. Defaults per architecture are PEFT's
(:data:`peft_lab.arch.DEFAULT_TARGETS` rows ``"ia3"`` and ``"ia3_feedforward"``).

Typical use::

    model = apply_ia3(model)              # GPT-2: c_attn output, mlp.c_proj input; only the vectors train
    ...train...
    with disable_ia3(model):              # exactly the base model
        ...
    merge_ia3(model)                      # W ← diag(l) W or W diag(l): no cost at inference
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import core, validate
from .arch import DEFAULT_TARGETS
from .core import AdapterLayer, matches_target

__all__ = ["IA3Config", "IA3Layer", "apply_ia3", "ia3_config", "ia3_layers", "merge_ia3", "unmerge_ia3",
           "disable_ia3", "remove_ia3", "ia3_state_dict", "load_ia3_state_dict", "is_feedforward",
           "SUPPORTED_LAYERS", "DEFAULT_TARGET_MODULES", "DEFAULT_FEEDFORWARD_MODULES"]

SUPPORTED_LAYERS = (nn.Linear, Conv1D)
#: PEFT's ``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` for the architectures here.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = DEFAULT_TARGETS["ia3"]
#: PEFT's ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``: the targets scaled on the input side.
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = DEFAULT_TARGETS["ia3_feedforward"]

_METHOD = "ia3"


@dataclass(frozen=True)
class IA3Config:
    """The settings :func:`apply_ia3` used; :func:`ia3_config` returns them, the PEFT export writes them.
    Each of ``target_modules`` and ``feedforward_modules`` is a tuple of names or one regular expression."""

    target_modules: tuple[str, ...] | str = ("c_attn", "mlp.c_proj")
    feedforward_modules: tuple[str, ...] | str = ("mlp.c_proj",)


def is_feedforward(name: str, feedforward_modules: Sequence[str] | str) -> bool:
    """Whether the target called ``name`` is scaled on its input (06.2) — PEFT's rule
    (:func:`peft_lab.core.ends_with_module`); ``feedforward_modules`` must be a subset of ``target_modules``,
    so in practice it agrees with :func:`peft_lab.core.matches_target`."""
    return core.ends_with_module(name, feedforward_modules)


class IA3Layer(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (06.1) or, for a feed-forward module, input (06.2) is
    multiplied element-wise by the trainable vector ``ia3_l`` (initialised to ones, 06.3).

    Attributes: ``in_features``, ``out_features``, ``is_feedforward``, ``fan_in_fan_out`` (True for ``Conv1D``),
    ``merged``, ``disabled``.
    """

    merged_fix = "unmerge_ia3(model)"

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
        """``l`` shaped to broadcast over the stored weight (06.4): ``(d_out, 1)`` scales rows of ``d_out × d_in``
        and ``(1, d_in)`` its columns; ``Conv1D``'s ``d_in × d_out`` needs the transpose."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        """Equation (06.4): ``W ← diag(l) W, b ← l ⊙ b`` (output side) or ``W ← W diag(l)`` (input side)."""
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
        if self.is_feedforward:  # (06.2): the vector acts before the weight
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)  # (06.1)

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, size={self.ia3_l.numel()}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------------------
# Whole-model operations
# ----------------------------------------------------------------------------------------------------------

def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Layer]]:
    """``(name, layer)`` for every :class:`IA3Layer` in ``model``, in module order."""
    return core.find_layers(validate.require_module("model", model), IA3Layer)


def _require_ia3(model: nn.Module, action: str | None = None) -> list[tuple[str, IA3Layer]]:
    """The IA3 layers; with ``action``, refused inside :func:`disable_ia3` (it restores the merged state)."""
    layers = core.require_layers(model, IA3Layer, "IA3", "apply_ia3(model, ...)")
    if action and any(layer.disabled for _, layer in layers):
        raise ValueError(f"{action} inside `with disable_ia3(model):` is not allowed: the block restores the "
                         f"layers' merged state when it ends. Call {action} after the block")
    return layers


def _resolve_feedforward(model: nn.Module, feedforward_modules, targets) -> tuple[str, ...] | str:
    """``feedforward_modules`` checked: ``None`` → the architecture's default (PEFT's table; an unknown
    architecture must name them, ``[]`` for none); a list must be a subset of a list ``target_modules``."""
    if feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_FEEDFORWARD_MODULES:
            raise ValueError(f"no default feedforward_modules for model type {model_type!r}; pass "
                             "feedforward_modules=[...] (the targets whose input IA3 scales), or [] for none")
        return tuple(DEFAULT_FEEDFORWARD_MODULES[model_type])
    if isinstance(feedforward_modules, str):
        if not feedforward_modules:
            raise ValueError("feedforward_modules is an empty string; pass a list of module names such as "
                             "['mlp.c_proj'], [] for none, or None for the architecture's default")
        try:
            re.compile(feedforward_modules)
        except re.error as err:
            raise ValueError(f"feedforward_modules={feedforward_modules!r} is one string, read as a regular "
                             f"expression, and it is not a valid one ({err}); to list names pass a list") from None
        ff = feedforward_modules
    elif isinstance(feedforward_modules, (list, tuple, set, frozenset)):
        ff = tuple(feedforward_modules)
        if not all(isinstance(f, str) and f for f in ff):
            raise ValueError(f"feedforward_modules must be a list of non-empty strings, got {feedforward_modules!r}")
        ff = tuple(sorted(ff)) if isinstance(feedforward_modules, (set, frozenset)) else ff
    else:
        raise TypeError(f"feedforward_modules must be None, a list of module names or a regex string, "
                        f"got {validate.describe(feedforward_modules)}")
    if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
        extra = sorted(set(ff) - set(targets))
        raise ValueError(f"feedforward_modules must be a subset of target_modules (PEFT's rule): {extra} "
                         f"is not in target_modules {list(targets)}")
    return ff


def _check_args(model, target_modules, feedforward_modules):
    """The arguments of :func:`apply_ia3` checked; returns ``(targets, feedforward, matched)``."""
    validate.require_module("model", model)
    if any(True for _ in ia3_layers(model)):
        raise ValueError("this model already has IA3 layers; applying IA3 twice is not supported. "
                         "Call remove_ia3(model) first, or use a fresh copy of the base model.")
    targets = core.resolve_targets(model, target_modules, DEFAULT_TARGET_MODULES, SUPPORTED_LAYERS)
    feedforward = _resolve_feedforward(model, feedforward_modules, targets)
    matched = [(n, m) for n, m in model.named_modules() if n and matches_target(n, targets)]
    if not matched:
        raise ValueError(core.no_match_hint(model, targets, SUPPORTED_LAYERS))
    wrong = [(n, type(m).__name__) for n, m in matched if not isinstance(m, SUPPORTED_LAYERS)]
    if wrong:
        listed = ", ".join(f"{n} ({t})" for n, t in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
        raise TypeError(f"IA3 here wraps nn.Linear and Conv1D layers only, but target_modules {targets!r} "
                        f"matched {listed}. {core.describe_layers(model, SUPPORTED_LAYERS)}")
    core.require_untied(model, [n for n, _ in matched])
    return targets, feedforward, matched


def apply_ia3(model: nn.Module, target_modules: Sequence[str] | str | None = None,
              feedforward_modules: Sequence[str] | str | None = None) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`IA3Layer`, freeze everything else; return ``model``.

    ``target_modules=None`` takes the architecture's default (GPT-2 ``["c_attn", "mlp.c_proj"]``, LLaMA
    ``["k_proj", "v_proj", "down_proj"]``); matching follows :func:`peft_lab.core.matches_target`.
    ``feedforward_modules=None`` takes the default feed-forward set (GPT-2 ``["mlp.c_proj"]``, LLaMA
    ``["down_proj"]``), even when ``target_modules`` is given, as PEFT does; ``[]`` scales every target's
    output. Which targets are feed-forward follows :func:`is_feedforward`. Changed in place; a failed call
    leaves the model unchanged. Afterwards only the ``ia3_l`` vectors have ``requires_grad=True`` (06.6).
    """
    targets, feedforward, matched = _check_args(model, target_modules, feedforward_modules)
    wrapped = [(name, IA3Layer(module, is_feedforward(name, feedforward))) for name, module in matched]
    core.freeze(model)
    for name, layer in wrapped:
        core.replace_module(model, name, layer)
    core.record_config(model, _METHOD, IA3Config(targets, feedforward))
    return model


def ia3_config(model: nn.Module) -> IA3Config:
    """The :class:`IA3Config` that :func:`apply_ia3` recorded on ``model`` (or one naming the layers exactly,
    for layers placed by hand)."""
    layers = _require_ia3(model)
    config = core.get_config(model, _METHOD)
    if config is None:
        config = IA3Config(tuple(n for n, _ in layers), tuple(n for n, layer in layers if layer.is_feedforward))
    return config


def merge_ia3(model: nn.Module) -> nn.Module:
    """Equation (06.4) in every IA3 layer. Outputs stay equal up to float rounding."""
    for _, layer in _require_ia3(model, "merge_ia3"):
        layer.merge()
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_ia3` (divide by ``l``; restores ``W`` up to float rounding)."""
    for _, layer in _require_ia3(model, "unmerge_ia3"):
        layer.unmerge()
    return model


@contextmanager
def disable_ia3(model: nn.Module):
    """Context manager: inside it the model computes the base model alone. Unmerged layers skip the scaling,
    so the output equals the base model's exactly; merged layers are unmerged on entry and merged on exit."""
    layers = [layer for _, layer in _require_ia3(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        with core.disabled(layers):
            yield model
    finally:
        for layer in merged:
            layer.merge()


def remove_ia3(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain layers back. ``merge=True`` keeps the learned scaling inside ``W`` (06.4); ``merge=False``
    drops it (the base model again, up to rounding if it was merged)."""
    merge = validate.require_bool("merge", merge)
    for name, layer in _require_ia3(model, "remove_ia3"):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        core.replace_module(model, name, layer.base_layer)
    core.clear_config(model, _METHOD)
    return model


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the IA3 vectors: ``{"<layer>.ia3_l": l, ...}`` — PEFT's file keys without ``base_model.model.``.
    Detached and sharing storage, like ``state_dict``."""
    return {f"{name}.ia3_l": layer.ia3_l.detach() for name, layer in _require_ia3(model)}


def load_ia3_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy IA3 vectors (keys as in :func:`ia3_state_dict`) into ``model``; strict, all or nothing
    (:func:`peft_lab.core.load_adapter_state_dict`). Merged layers are refused (unmerge first)."""
    expected = ia3_state_dict(model)
    if any(layer.merged for _, layer in ia3_layers(model)):
        raise ValueError("cannot load IA3 vectors into merged layers; call unmerge_ia3(model) first")
    core.load_adapter_state_dict(expected, state_dict, what="IA3")
    return model
