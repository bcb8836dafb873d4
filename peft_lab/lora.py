"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021), notebook 02.

The equations of notebook 02 ("LoRA"), numbered as there, for a layer ``W: d_out × d_in`` (the notebook
writes ``d = d_out``, ``k = d_in``):

* (02.1) ``ΔW = B A``,  ``B: d_out × r``, ``A: r × d_in``, ``r ≪ min(d_in, d_out)``
* (02.2) ``h = W x + s · B (A x)``, ``s = α / r`` — the forward pass never forms ``ΔW``; it costs
  ``r (d_in + d_out)`` extra multiply-adds per token
* (02.3) initialisation ``A ~ kaiming_uniform(a=√5)``, ``B = 0``, hence ``ΔW = 0`` and ``h = W x`` at step 0
* (02.4) gradients ``∂L/∂B = s · g (A x)ᵀ``, ``∂L/∂A = s · Bᵀ g xᵀ`` with ``g = ∂L/∂h`` (autograd computes them)
* (02.5) trainable parameters per layer: ``r (d_in + d_out)`` instead of ``d_in · d_out``
* (02.6) scaling ``s = α / r``, or ``s = α / √r`` with rank-stabilised LoRA (rsLoRA, Kalajdzievski 2023)
* (02.7) merge ``W ← W + s · B A`` (no extra inference cost), unmerge ``W ← W − s · B A``

Layout is PEFT's, so weights copy one to one: ``lora_A = nn.Linear(d_in, r, bias=False)``,
``lora_B = nn.Linear(r, d_out, bias=False)``, the wrapped layer is ``base_layer``, and dropout acts on the
LoRA branch only: ``base_layer(x) + lora_B(lora_A(dropout(x))) · s``. GPT-2's ``Conv1D`` stores its weight
as ``d_in × d_out`` (PEFT's ``fan_in_fan_out=True``); only the merge needs to transpose ``B A`` for it.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), notebook 05 ("DoRA"), is LoRA with
``use_dora=True``. Per output feature ``i`` (row ``i`` of ``W₀: d_out × d_in``):

* (05.7) ``W' = m ⊙ (W₀ + s B A) / n``,  ``n_i = ‖(W₀ + s B A)_i‖₂`` — a magnitude ``m ∈ ℝ^d_out`` times a
  unit direction. The paper writes ``‖·‖_c`` over the columns of its ``W ∈ ℝ^{d×k}``; PEFT takes one norm
  per *output feature* (``torch.linalg.norm(W, dim=1)`` on the ``d_out × d_in`` layout, ``Conv1D``'s
  weight transposed first), and so do we — ``m`` has ``d_out`` entries;
* (05.8) ``m`` starts at ``n`` computed at init (``‖W₀‖`` per row, as ``B = 0``), so ``m / n = 1`` exactly and
  the start is the base model bit for bit;
* (05.9) ``n`` is treated as a constant in backward (the paper's §4.3, "detached from the gradient graph";
  PEFT does the same): the gradient reaches ``A`` and ``B`` only through ``s B A x`` and ``m`` directly;
* (05.10) forward without forming ``W'``: ``h = W₀x + b + (m/n − 1) ⊙ W₀x + (m/n) ⊙ s B A x`` (the bias
  stays outside the decomposition), which is ``(m/n) ⊙ (W₀ + sBA) x + b``. With dropout ``p > 0`` while
  training, PEFT feeds ``x̃ = dropout(x)`` to both extra terms: ``W₀x + b + (m/n − 1) ⊙ W₀x̃ + (m/n) ⊙ sBAx̃``;
  we do the same;
* (05.11) merge ``W ← (m/n) ⊙ (W₀ + sBA)`` (row-wise), keeping ``n`` for unmerge ``W₀ = W / (m/n) − sBA``.

Trainable parameters per layer: ``r (d_in + d_out) + d_out``; PEFT saves ``m`` as
``<layer>.lora_magnitude_vector``, and so does :func:`lora_state_dict`.

Typical use::

    model = apply_lora(model, rank=8, alpha=16)   # freezes the base; only A and B train
    ...train...
    with disable_lora(model):                       # exactly the base model
        base_logits = model(ids).logits
    merge_lora(model)                               # W ← W + s·BA: the adapter costs nothing at inference
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import arch, core, registry, validate
from .arch import DEFAULT_TARGETS
from .core import AdapterLayer

__all__ = [
    "LoRAConfig", "LoRALinear", "DoRALinear", "apply_lora", "merge_lora", "unmerge_lora",
    "disable_lora", "remove_lora", "lora_layers", "lora_state_dict", "load_lora_state_dict", "lora_config",
    "lora_scaling", "SUPPORTED_LAYERS", "INITS", "loraplus_optimizer", "magnitude_direction_change",
    "query_weight_changes", "pissa_factors", "olora_factors",
]

#: Layer types LoRA can wrap here.
SUPPORTED_LAYERS = (nn.Linear, Conv1D)

@dataclass(frozen=True)
class LoRAConfig:
    """LoRA's settings, checked when made (numpy/torch scalars become Python numbers); :func:`apply_lora`
    builds one from its keywords, :func:`lora_config` returns the one applied, the PEFT export writes it.

    ``target_modules`` is a tuple of names (suffix rule, see :func:`peft_lab.core.matches_target`), one
    regular expression string, or ``None`` for the architecture's default (resolved, and recorded resolved,
    when applied).
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self):
        fix = partial(object.__setattr__, self)  # frozen: normalised values are written once, here
        fix("rank", validate.require_int("rank", self.rank, min=1))
        alpha, dropout = validate.as_python_number(self.alpha), validate.as_python_number(self.dropout)
        fix("alpha", validate.require_real("alpha", alpha, min=0, min_open=True))
        fix("dropout", validate.require_real("dropout", dropout, min=0, max=1, max_open=True))
        fix("use_rslora", validate.require_bool("use_rslora", self.use_rslora))
        fix("use_dora", validate.require_bool("use_dora", self.use_dora))
        validate.require_str("init", self.init, choices=INITS)
        if self.use_dora and self.init != "default":
            raise ValueError(f"init={self.init!r} with use_dora=True is not supported here; use one of them")
        if self.target_modules is not None:
            fix("target_modules", core.module_names(self.target_modules, "target_modules"))

    @property
    def scaling(self) -> float:
        """Equation (02.6): ``α / r``, or ``α / √r`` with rsLoRA."""
        return lora_scaling(self.rank, self.alpha, self.use_rslora)


#: LoRA's initialisations (notebook 08): ``"default"`` (02.3), ``"pissa"`` (Meng et al. 2024) and ``"olora"``
#: (Büyükakyüz 2024), PEFT's ``init_lora_weights=True | "pissa" | "olora"``.
INITS = ("default", "pissa", "olora")


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """Equation (02.6): the factor ``s`` in ``h = W x + s · B A x`` — ``α / r``, or ``α / √r`` (rsLoRA)."""
    c = LoRAConfig(rank, alpha, use_rslora=use_rslora)
    return c.alpha / math.sqrt(c.rank) if c.use_rslora else c.alpha / c.rank


def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024, §3; notebook 08 eqs. 08.4–08.5) on a ``d_out × d_in`` weight: with the SVD
    ``W = U S Vᵀ``, ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ`` (the r largest singular triplets, split evenly so
    that ``s·B A = U_r S_r V_rᵀ``) and the residual ``W − s·B A``. Returns ``(A, B, W_res)``."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(S[:rank] / scaling)
    a, b = torch.diag(root) @ Vh[:rank], U[:, :rank] @ torch.diag(root)
    return a, b, weight - scaling * b @ a


def olora_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, §3; notebook 08 eq. 08.6) on a ``d_out × d_in`` weight: with ``W = Q R``,
    ``B = Q_r`` (the first r orthonormal columns), ``A = R_r`` (the first r rows of R) and the residual
    ``W − s·B A``. Returns ``(A, B, W_res)``."""
    Q, R = torch.linalg.qr(weight)
    a, b = R[:rank], Q[:, :rank]
    return a, b, weight - scaling * b @ a


class LoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus a trainable low-rank update (equations 02.1–02.7).

    ``forward(x) = base_layer(x) + lora_B(lora_A(lora_dropout(x))) · scaling`` (02.2), or ``base_layer(x)``
    alone while merged (the update then lives inside the weight, 02.7) or disabled (:func:`disable_lora`).
    Attributes: ``in_features`` (d_in), ``out_features`` (d_out), ``rank`` (r), ``alpha`` (α), ``scaling`` (s),
    ``fan_in_fan_out`` (True for ``Conv1D``, whose weight is stored d_in × d_out), ``merged``, ``disabled``.
    """

    adapter_modules = ("lora_A", "lora_B")
    merged_fix = "unmerge_lora(model)"
    use_dora = False  # DoRALinear says True

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default"):
        super().__init__()
        c = LoRAConfig(rank, alpha, dropout, use_rslora=use_rslora, init=init)
        rank, alpha, dropout, use_rslora = c.rank, c.alpha, c.dropout, c.use_rslora
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(f"base_layer must be an nn.Linear or transformers' Conv1D (what LoRALinear wraps), "
                            f"got {validate.describe(base_layer)}")
        weight = base_layer.weight
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # nn.Linear stores W as (d_out, d_in); Conv1D as (d_in, d_out).
        d_in, d_out = (weight.shape if self.fan_in_fan_out else weight.shape[::-1])
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        dtype = core.adapter_dtype(weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.reset_lora_parameters(c.init)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """Equation (02.3): ``A`` kaiming-uniform (a = √5, PEFT's choice), ``B = 0`` — so ``ΔW = 0`` at start.

        ``"pissa"`` and ``"olora"`` start ``B A`` on a rank-r piece of ``W`` itself and leave the residual in the
        base, ``W_res = W − s·B A``, so the layer still computes ``W x`` at step 0 (up to rounding) but the base
        weight is changed: switching LoRA off then gives the residual model, as in PEFT. PiSSA: ``W = V S Uᵀ``,
        ``B = V_r √(S_r/s)``, ``A = √(S_r/s) U_rᵀ`` (the r largest singular triplets); OLoRA: ``W = Q R``,
        ``B = Q_r``, ``A = R_r`` (the first r columns of Q, rows of R). Both run in float32 on the ``d_out × d_in``
        weight (``Conv1D``'s transposed first; PEFT's OLoRA skips that transpose, and fails on GPT-2)."""
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            return
        w = core.stored_weight(self.base_layer)
        weight = (w.T if self.fan_in_fan_out else w).detach().to(torch.float32)
        factors = pissa_factors if init == "pissa" else olora_factors
        a, b, residual = factors(weight, self.rank, self.scaling)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            w.copy_((residual.T if self.fan_in_fan_out else residual).to(w.dtype))

    def delta_weight(self) -> torch.Tensor:
        """Equations (02.1) and (02.7): ``ΔW = s · B A`` in the base weight's layout (transposed for ``Conv1D``)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in the base weight's layout, without changing the layer:
        ``W₀ + s·BA`` (02.7); the stored weight while merged."""
        w = self.base_layer.weight
        return w.detach().clone() if self.merged else (w + self.delta_weight().to(w.dtype)).detach()

    @torch.no_grad()
    def merge(self) -> None:
        """Equation (02.7): ``W ← W + s · B A``; afterwards forward is a plain ``base_layer(x)``."""
        if not self.merged:
            w = core.stored_weight(self.base_layer)
            w += self.delta_weight().to(w.dtype)
            self.merged = True


    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W ← W − s · B A`` (equal to the old ``W`` up to float rounding, ~1e-7)."""
        if self.merged:
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (02.2)
        return result.to(out_dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}")


class DoRALinear(LoRALinear):
    """DoRA (05.7–05.11): a :class:`LoRALinear` whose updated weight is split into a magnitude and a unit
    direction per output feature, ``W' = m ⊙ (W₀ + sBA) / n``; one more trainable vector,
    ``lora_magnitude_vector`` (m, ``d_out`` entries). :func:`apply_lora` builds it for ``use_dora=True``."""

    use_dora = True

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default"):
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init)
        self._merged_norm: torch.Tensor | None = None  # n at merge time, for unmerge (05.11)
        # (05.8): m = n at the start (B = 0, so n = ‖W₀‖ per row) and m / n = 1 exactly
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.delta_weight()).detach())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """A and B, and ``lora_magnitude_vector`` (m) under PEFT's key."""
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Equation (05.7): ``n = ‖W₀ + ΔW‖`` per output feature (``ΔW`` in the base weight's layout). The
        norm runs over the input dimension: dim 1 of ``nn.Linear``'s ``d_out × d_in``, dim 0 of ``Conv1D``'s."""
        w = self.base_layer.weight.to(delta.dtype)
        if self.fan_in_fan_out:
            w, delta = w.T, delta.T
        return torch.linalg.norm(w + delta, dim=1)

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """``m / n`` shaped to scale the rows of the stored weight (its columns for ``Conv1D``), (05.11)."""
        factor = (self.lora_magnitude_vector / norm).view(-1, 1)
        return factor.T if self.fan_in_fan_out else factor

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``(m/n) ⊙ (W₀ + s·BA)`` (05.7) in the base weight's layout; the stored weight while merged."""
        w = self.base_layer.weight
        if self.merged:
            return w.detach().clone()
        delta = self.delta_weight()
        return (self._factor(self.weight_norm(delta)) * (w + delta)).to(w.dtype).detach()

    @torch.no_grad()
    def merge(self) -> None:
        """Equation (05.11): ``W ← (m/n) ⊙ (W + s · B A)``, keeping ``n`` for :meth:`unmerge`."""
        if self.merged:
            return
        w, delta = core.stored_weight(self.base_layer), self.delta_weight()
        self._merged_norm = self.weight_norm(delta)
        w.copy_((self._factor(self._merged_norm) * (w + delta)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W ← W / (m/n) − s · B A`` with the ``n`` of the merge (up to float rounding)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w / self._factor(self._merged_norm) - self.delta_weight()).to(w.dtype))
        self._merged_norm = None
        self.merged = False

    def _norm(self) -> torch.Tensor:
        """``n`` of (05.7) for forward, a constant for autograd (05.9): ``B A`` enters detached, and the result
        is detached again."""
        delta = (self.lora_B.weight @ self.lora_A.weight).detach() * self.scaling
        return self.weight_norm(delta.T if self.fan_in_fan_out else delta).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Equation (05.10): ``W₀x + b + (m/n − 1) ⊙ W₀x̃ + (m/n) ⊙ s B A x̃``. ``x̃ = x`` in eval mode or
        without dropout (then ``W₀x`` is the base output minus its bias), else ``dropout(x)`` — PEFT's choice."""
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        scale = self.lora_magnitude_vector / self._norm()
        weight = self.base_layer.weight.to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            x = self.lora_dropout(x)
            base = nn.functional.linear(x, weight.T if self.fan_in_fan_out else weight)
        result = result + (scale - 1) * base + scale * self.lora_B(self.lora_A(x)) * self.scaling
        return result.to(out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


# ----------------------------------------------------------------------------------------------------------
# Whole-model operations (written once in core.LayerMethod)
# ----------------------------------------------------------------------------------------------------------

_LAYERS = core.LayerMethod("lora", LoRALinear, "LoRA", "lora", SUPPORTED_LAYERS)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` for every :class:`LoRALinear` in ``model``, in module order."""
    return iter(_LAYERS.layers(model))


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] | str | None = None, use_rslora: bool = False,
               use_dora: bool = False, init: str = "default", *, config: LoRAConfig | None = None) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`LoRALinear`, freeze everything else; return ``model``.

    The model is changed in place (as PEFT's ``get_peft_model`` does). ``target_modules=None`` takes the
    default of the architecture (:data:`peft_lab.arch.DEFAULT_TARGETS`, e.g. GPT-2 → ``["c_attn"]``,
    LLaMA/OPT → ``["q_proj", "v_proj"]``); matching follows :func:`peft_lab.core.matches_target`.
    Afterwards only the ``lora_A``/``lora_B`` weights have ``requires_grad=True`` (equation 02.5 counts them).
    ``use_dora=True`` makes it DoRA (05.7–05.11), which adds the magnitude vector ``m`` per layer; ``init``
    chooses the initialisation (:meth:`LoRALinear.reset_lora_parameters`: PiSSA and OLoRA change the base). The keywords
    build a :class:`LoRAConfig` (which checks them); or pass ``config=`` instead. A model carries one method at
    a time (:func:`peft_lab.registry.require_no_method`). A failed call leaves the model unchanged.
    """
    validate.require_module("model", model)
    if config is None:
        config = LoRAConfig(rank, alpha, dropout, target_modules, use_rslora, use_dora, init)
    elif not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {validate.describe(config)}")
    registry.require_no_method(model, "LoRA")
    targets, matched = _LAYERS.match_targets(model, config.target_modules, DEFAULT_TARGETS["lora"])
    layer_class = DoRALinear if config.use_dora else LoRALinear
    # PiSSA and OLoRA write the residual into the base while a layer is built: keep the old weights until all
    # are built, so that a failed call still leaves the model as it came
    saved = [(m.weight, m.weight.detach().clone()) for _, m in matched] if config.init != "default" else []
    try:
        wrapped = [(name, layer_class(module, config.rank, config.alpha, config.dropout, config.use_rslora,
                                      config.init)) for name, module in matched]
    except BaseException:
        with torch.no_grad():
            for weight, old in saved:
                weight.copy_(old)
        raise
    return _LAYERS.install(model, wrapped, replace(config, target_modules=targets))


def lora_config(model: nn.Module) -> LoRAConfig:
    """The :class:`LoRAConfig` that :func:`apply_lora` recorded on ``model`` (for layers placed by hand, one
    naming them exactly)."""
    config = _LAYERS.recorded_config(model)
    if config is None:
        layers = _LAYERS.layers(model)
        first = layers[0][1]
        p = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
        config = LoRAConfig(first.rank, first.alpha, p, tuple(n for n, _ in layers), first.use_rslora,
                            first.use_dora)
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Equation (02.7) in every LoRA layer: ``W ← W + s · B A``. Outputs stay equal up to float rounding."""
    return _LAYERS.merge(model)


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`: ``W ← W − s · B A`` (restores ``W`` up to float rounding)."""
    return _LAYERS.unmerge(model)


def disable_lora(model: nn.Module):
    """Context manager: inside it the model computes the base model alone, ``h = W x`` — exactly for unmerged
    layers; merged ones are unmerged on entry and merged again on exit (then up to rounding)."""
    return _LAYERS.disable(model)


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain layers back. ``merge=True`` keeps the learned update inside ``W`` (equation 02.7);
    ``merge=False`` drops it (the base model again). Base parameters stay frozen (``requires_grad=False``)."""
    return _LAYERS.remove(model, validate.require_bool("merge", merge))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights: ``{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B, ...}``, and with
    DoRA ``"<layer>.lora_magnitude_vector": m`` (PEFT's key).

    Names are the model's own module names (e.g. ``transformer.h.0.attn.c_attn.lora_A.weight``); PEFT's
    files add the prefix ``base_model.model.``. Tensors are detached and share storage, like ``state_dict``.
    """
    return _LAYERS.state_dict(model)


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy LoRA weights (keys as in :func:`lora_state_dict`) into ``model``; strict, all or nothing
    (:func:`peft_lab.core.load_adapter_state_dict`). Merged layers are refused (unmerge first)."""
    return _LAYERS.load_state_dict(model, state_dict)


def magnitude_direction_change(w0: torch.Tensor, w: torch.Tensor, fan_in_fan_out: bool = False
                               ) -> tuple[float, float]:
    """How far ``w`` moved from ``w0`` in magnitude and in direction — the two measures of DoRA's weight
    decomposition analysis (Liu et al. 2024, §3, their Fig. 2), per output feature ``i`` (the orientation of
    DoRA's ``m`` here, see (05.7)):

    ``ΔM = mean_i | ‖w_i‖ − ‖w0_i‖ |``,   ``ΔD = mean_i (1 − cos(w_i, w0_i))``.

    ``fan_in_fan_out=True`` for ``Conv1D``'s ``d_in × d_out`` layout. Returns ``(ΔM, ΔD)`` as floats.
    """
    for name, value in (("w0", w0), ("w", w)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (a weight matrix), got {validate.describe(value)}")
    if w0.shape != w.shape or w.ndim != 2:
        raise ValueError(f"w0 and w must be 2-D weights of one shape, got {tuple(w0.shape)} and {tuple(w.shape)}")
    validate.require_bool("fan_in_fan_out", fan_in_fan_out)
    a, b = (w0.T, w.T) if fan_in_fan_out else (w0, w)
    a, b = a.detach().double(), b.detach().double()
    delta_m = (b.norm(dim=1) - a.norm(dim=1)).abs().mean().item()
    delta_d = (1 - nn.functional.cosine_similarity(b, a, dim=1)).mean().item()
    return delta_m, delta_d


def query_weight_changes(model: nn.Module, base: nn.Module) -> list[tuple[float, float]]:
    """``(ΔM, ΔD)`` of :func:`magnitude_direction_change` for the query projection of every block of ``model``
    against the same block of ``base`` (the paper's Fig. 2 analyses the query matrix). ``model`` may be fully
    fine-tuned or carry LoRA/DoRA (then its :meth:`LoRALinear.effective_weight`); GPT-2's fused ``c_attn``
    contributes its first ``d`` output features, the queries."""
    validate.require_module("model", model)
    validate.require_module("base", base)
    out = []
    fused = arch.layout(base).fused_qkv
    for i in range(len(arch.blocks(base))):
        pair = []
        for m in (model, base):
            layer = getattr(arch.attention(m, i), arch.layout(m).qkv[0])
            w = layer.effective_weight() if isinstance(layer, LoRALinear) else layer.weight.detach()
            pair.append(w[:, :arch.width(m)] if fused else w)  # Conv1D: d_in × 3d, queries first
        out.append(magnitude_direction_change(pair[1], pair[0], fan_in_fan_out=fused))
    return out


def loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                       optimizer_cls: type = torch.optim.AdamW, lr_embedding: float = 1e-6,
                       **kwargs) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al. 2024, notebook 08): one optimizer with two learning rates, ``lr`` for every ``A`` and
    ``lr · ratio`` for every ``B``. The parameter groups are PEFT's ``create_loraplus_optimizer(model,
    optimizer_cls, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay)``, in its order: the
    ``A`` factors; trainable embeddings (``lr_embedding``); ``B`` factors and other vectors (DoRA's
    magnitudes) with ``weight_decay``; biases and norm weights at ``lr · ratio`` without decay. ``kwargs`` go
    to ``optimizer_cls``."""
    validate.require_module("model", model)
    lr = validate.require_real("lr", lr, min=0, min_open=True)
    ratio = validate.require_real("ratio", ratio, min=0, min_open=True)
    weight_decay = validate.require_real("weight_decay", weight_decay, min=0)
    # PEFT decays every parameter but biases and those of nn.LayerNorm modules (transformers' ALL_LAYERNORM_LAYERS)
    no_decay = {f"{m}.{p}" if m else p for m, module in model.named_modules()
                for p, _ in module.named_parameters(recurse=False) if isinstance(module, nn.LayerNorm)}
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}  # embedding: LoRA on
    for name, p in model.named_parameters():                                         # embeddings, not built here
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay or "bias" in name else "B"].append(p)
        else:
            groups["A"].append(p)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; apply_lora(model, ...) first")
    return optimizer_cls([{"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
                          {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
                          {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
                          {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio}],
                         lr=lr, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# PEFT's file format and the registry entry
# ----------------------------------------------------------------------------------------------------------

# settings a LoRA adapter may carry that this module does not implement (fine while off: None/False/"none"/empty)
_PEFT_UNSUPPORTED = ("bias", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                     "exclude_modules", "lora_bias", "target_parameters", "layer_replication",
                     "trainable_token_indices")


def peft_fields(config: LoRAConfig, target_modules, fan_in_fan_out: bool) -> dict:
    """PEFT's ``LoraConfig`` fields for ``config`` (``target_modules`` resolved by the caller)."""
    return {
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        # PEFT's flag for weights stored d_in × d_out (GPT-2's Conv1D); PEFT corrects it per layer type anyway.
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": config.use_rslora, "bias": "none", "init_lora_weights": True, "use_dora": config.use_dora,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }


def config_from_peft(fields: dict) -> LoRAConfig:
    """The :class:`LoRAConfig` that PEFT's ``LoraConfig`` fields describe; settings this module does not
    implement are refused by name."""
    for name in _PEFT_UNSUPPORTED:
        value = fields.get(name)
        if not (value is None or value is False or value == "none" or value == [] or value == {}):
            raise ValueError(f"this LoRA adapter uses {name}={value!r}, which peft_lab.lora does not implement")
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in fields:
            raise ValueError(f"the adapter's config lacks the LoRA field {name!r}")
    if fields["target_modules"] == "all-linear":
        raise ValueError('target_modules="all-linear" is not supported here; list the module names instead')
    init = fields.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", *INITS[1:]):
        raise ValueError(f"this LoRA adapter uses init_lora_weights={init!r}; peft_lab.lora has {list(INITS)}")
    # the weights are loaded next, so only an init that changes the base (PiSSA, OLoRA) matters here
    return LoRAConfig(fields["r"], fields["lora_alpha"], fields.get("lora_dropout", 0.0) or 0.0,
                      fields["target_modules"], bool(fields.get("use_rslora", False)),
                      bool(fields.get("use_dora", False)), init if init in INITS[1:] else "default")


def _to_peft(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's ``LoraConfig`` fields and the weights (keys without PEFT's prefix)."""
    config = lora_config(model)
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the LoRA layers are merged into W; call unmerge_lora(model) before exporting, "
                         "otherwise PEFT would add the update a second time")
    settings = {(layer.rank, layer.alpha, layer.use_rslora, layer.use_dora) for layer in layers}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers with different (rank, alpha, use_rslora, use_dora) {sorted(settings)} "
                         "cannot be described by one adapter_config.json")
    if config.init != "default":
        raise ValueError(f"a LoRA adapter initialised with init={config.init!r} changed the base weights (W − s·BA); "
                         "PEFT's file pairs it with the original base, so exporting it alone would not reproduce "
                         "this model. Export adapters trained from the default initialisation")
    fields = peft_fields(config, config.target_modules, any(layer.fan_in_fan_out for layer in layers))
    return fields, lora_state_dict(model)


def _from_peft(model: nn.Module, fields: dict) -> nn.Module:
    """Apply LoRA as PEFT's ``LoraConfig`` fields say (the weights are loaded after)."""
    return apply_lora(model, config=config_from_peft(fields))


_LAYERS.register(
    config_class=LoRAConfig, apply=lambda model, config: apply_lora(model, config=config),
    disable=disable_lora, remove=remove_lora, state_dict=lora_state_dict, load_state_dict=load_lora_state_dict,
    config_of=lora_config, serve=merge_lora, served_as="merged", peft_type="LORA", to_peft=_to_peft,
    from_peft=_from_peft,
    # the lowest trainable parameter is the lowest wrapped layer (the calculator finds it from the targets)
    memory={"lora": registry.MethodShape(lowest=None, required=("rank", "targets"), optional=("use_dora",))},
    memory_spec=lambda c, model_config: {
        "kind": "lora", "rank": c.rank, "use_dora": c.use_dora,
        "targets": arch.default_targets(model_config, "lora") if c.target_modules is None else c.target_modules})
