"""Many LoRA adapters on one frozen base (notebook 09): named adapters in every wrapped layer, one of them active
or one per row of a batch, weights swapped in place, and adapters merged into a new one as PEFT merges them.

The equations, for a wrapped layer ``W`` and adapters ``k = 1…N`` with factors ``A_k: r × d_in``,
``B_k: d_out × r`` and scaling ``s_k`` (equation 02.2 for each):

* (09.1) a mixed batch: row ``b`` is served by adapter ``a(b)`` (or by none, PEFT's ``"__base__"``):
  ``y_b = W x_b + s_{a(b)} B_{a(b)} A_{a(b)} x_b``;
* (09.2) grouped, as PEFT's ``_mixed_batch_forward``: for each adapter ``a`` the rows ``R_a = {b : a(b) = a}``
  form one sub-batch, ``Y[R_a] += s_a B_a (A_a X[R_a])`` — one pair of matrix products per adapter present;
* (09.3) gathered, the idea of Punica's BGMV kernel (Chen et al. 2023): stack ``A`` (N × r × d_in) and ``B``
  (N × d_out × r), index both with the rows' adapter numbers and multiply all rows at once with one batched
  product, ``Y += s[i] ⊙ B[i] (A[i] x)`` — one pair of products whatever the number of adapters;
* (09.4) merging, as ``add_weighted_adapter`` does: PEFT combines the *factors*, not the updates. With
  ``c_k = w_k s_k``: linear ``A' = Σ sign(c_k)√|c_k| A_k``, ``B' = Σ √|c_k| B_k`` (scaling 1), so
  ``B'A' = Σ_j Σ_k …`` holds cross terms ``B_j A_k``; ``cat`` stacks ``A' = [c_1 A_1; …]``, ``B' = [B_1 … B_N]``,
  so ``B'A' = Σ_k c_k B_k A_k`` exactly; TIES (Yadav et al. 2023) trims each factor to its ``density`` largest
  entries, elects a sign per entry from the trimmed factors and averages the weighted entries that agree;
  DARE (Yu et al. 2024) keeps each entry with probability ``density`` and divides by it, then adds
  (``dare_linear``) or elects signs as TIES does (``dare_ties``).

A model carries one method at a time (:func:`peft_lab.registry.require_no_method`): several adapters of this
module count as one method, "LoRA adapters".
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import core, registry, validate
from .arch import DEFAULT_TARGETS
from .lora import LoRAConfig, config_from_peft, lora_scaling, peft_fields

__all__ = ["LoRAAdapters", "MultiLoRALinear", "add_lora_adapter", "set_active_adapter", "mixed_batch",
           "lora_adapter_names", "lora_adapter_state_dict", "hotswap_adapter", "merge_adapters",
           "remove_lora_adapters", "elect_sign_mask", "COMBINATIONS", "BASE"]


class LoRAAdapters(dict):
    """The config of the whole method: adapter name → :class:`~peft_lab.lora.LoRAConfig`, in the order added.
    ``bases`` records, for an adapter read from a file, the base model it was trained on (the file's
    ``base_model_name_or_path``), so that adapters of different bases are not merged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bases: dict[str, str] = {}


BASE = "__base__"  #: the name that serves a row with the base model alone (PEFT's)
COMBINATIONS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
SUPPORTED_LAYERS = (nn.Linear, Conv1D)


class MultiLoRALinear(core.AdapterLayer):
    """A frozen ``nn.Linear``/``Conv1D`` with named LoRA adapters: ``lora_A[name]``, ``lora_B[name]`` and
    ``scaling[name]`` (PEFT's layout). ``active`` names the adapter that serves every row (``None``: the base);
    while ``rows`` holds one adapter name per row, each row gets its own (09.1), grouped (09.2) or gathered
    (09.3) as ``how`` says."""

    merged_fix = "(adapters here are never merged into the base)"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(f"base_layer must be an nn.Linear or Conv1D, got {validate.describe(base_layer)}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        d_in, d_out = base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.rows: list[str] | None = None
        self.how = "grouped"

    def add(self, name: str, config: LoRAConfig) -> None:
        """A new adapter initialised as LoRA is (02.3): ``A`` kaiming-uniform, ``B = 0``."""
        w = self.base_layer.weight
        dtype = core.adapter_dtype(w.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, config.rank, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(config.rank, self.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = config.scaling

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """``lora_A.<name>.weight`` and ``lora_B.<name>.weight`` of every adapter (PEFT's keys inside a layer)."""
        return {f"{side}.{name}.weight": getattr(self, side)[name].weight
                for name in self.lora_A for side in ("lora_A", "lora_B")}

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s B A x`` of one adapter (02.2)."""
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled:
            return result
        h = x.to(next(iter(self.lora_A.values())).weight.dtype) if len(self.lora_A) else x
        if self.rows is not None:
            extra = self._grouped(h) if self.how == "grouped" else self._gathered(h)
            return result + extra.to(result.dtype)
        if self.active is None:
            return result
        return result + self.delta(self.active, h).to(result.dtype)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(09.2): one sub-batch per adapter present; base rows get nothing."""
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for name in dict.fromkeys(self.rows):
            if name != BASE:
                index = [b for b, a in enumerate(self.rows) if a == name]
                out[index] = self.delta(name, x[index])
        return out

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """(09.3): stacked factors indexed per row, one batched product; a base row uses an all-zero slot."""
        names = list(self.lora_A)
        if len({self.lora_A[n].out_features for n in names}) > 1:
            raise ValueError("the gathered mixed batch stacks the factors: every adapter needs the same rank")
        zero_a = torch.zeros_like(self.lora_A[names[0]].weight)
        zero_b = torch.zeros_like(self.lora_B[names[0]].weight)
        A = torch.stack([self.lora_A[n].weight for n in names] + [zero_a])              # (N+1) × r × d_in
        B = torch.stack([self.lora_B[n].weight for n in names] + [zero_b])              # (N+1) × d_out × r
        s = torch.tensor([self.scaling[n] for n in names] + [0.0], dtype=x.dtype, device=x.device)
        idx = torch.tensor([names.index(a) if a != BASE else len(names) for a in self.rows], device=x.device)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])                                    # B × T × d_in
        low = torch.bmm(flat, A[idx].transpose(1, 2))                                     # B × T × r
        return (torch.bmm(low, B[idx].transpose(1, 2)) * s[idx].view(-1, 1, 1)).reshape(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active!r}, fan_in_fan_out={self.fan_in_fan_out}"


_LAYERS = core.LayerMethod("multi_lora", MultiLoRALinear, "LoRA adapters", "lora_adapters", SUPPORTED_LAYERS,
                           apply_hint="add_lora_adapter(model, name, ...)")


def _layers(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    return _LAYERS.require(model)


def lora_adapter_names(model: nn.Module) -> list[str]:
    """The adapters ``model`` holds, in the order they were added."""
    return list(_layers(model)[0][1].lora_A)


def add_lora_adapter(model: nn.Module, name: str, config: LoRAConfig | None = None, **settings) -> nn.Module:
    """Add adapter ``name`` (a :class:`~peft_lab.lora.LoRAConfig`, or its keywords) to every target layer; the
    first call wraps the targets in :class:`MultiLoRALinear` and freezes the base. Later adapters must target
    the same layers. The new adapter becomes the active one, and the only trainable one (PEFT's ``add_adapter``
    followed by ``set_adapter``)."""
    validate.require_module("model", model)
    validate.require_str("name", name)
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved: in a mixed batch it names the rows served by the base alone")
    config = LoRAConfig(**settings) if config is None else config
    if not isinstance(config, LoRAConfig) or config.use_dora:
        raise TypeError(f"config must be a LoRAConfig without DoRA (PEFT's mixed batch has no DoRA), got {config!r}")
    if not _LAYERS.present(model):
        registry.require_no_method(model, "LoRA adapters")
        _, matched = _LAYERS.match_targets(model, config.target_modules, DEFAULT_TARGETS["lora"])
        _LAYERS.install(model, [(n, MultiLoRALinear(m)) for n, m in matched], LoRAAdapters())
    layers = _layers(model)
    if name in layers[0][1].lora_A:
        raise ValueError(f"an adapter named {name!r} exists already; hotswap_adapter replaces its weights")
    targets = core.resolve_targets(model, config.target_modules, DEFAULT_TARGETS["lora"], SUPPORTED_LAYERS)
    unmatched = [n for n, _ in layers if not core.matches_target(n, targets)]
    if unmatched:
        raise ValueError(f"adapter {name!r} targets {targets!r}, which leaves out {unmatched[0]!r}: every adapter of "
                         "a model here wraps the same layers")
    for _, layer in layers:
        layer.add(name, config)
    _record(model, name, config)
    return set_active_adapter(model, name)


def _record(model: nn.Module, name: str, config: LoRAConfig, base: str | None = None) -> None:
    """A new record with adapter ``name`` added (never changed in place, so a rollback restores the old one)."""
    record = _configs(model)
    record[name] = config
    if base:
        record.bases[name] = base
    core.record_config(model, "multi_lora", record)


def set_active_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Serve every row with adapter ``name`` (``None``: the base alone); only its factors train."""
    layers = _layers(model)
    known = list(layers[0][1].lora_A)
    if name is not None and name not in known:
        raise ValueError(f"no adapter named {name!r}; this model has {known}")
    for _, layer in layers:
        layer.active = name
        for n in known:
            layer.lora_A[n].requires_grad_(n == name)
            layer.lora_B[n].requires_grad_(n == name)
    return model


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], how: str = "grouped"):
    """Inside the block row ``b`` of every batch is served by ``adapter_names[b]`` (09.1; ``"__base__"``: the base
    alone), computed ``"grouped"`` (09.2, PEFT's way) or ``"gathered"`` (09.3). PEFT's equivalent is
    ``model(..., adapter_names=adapter_names)``. Inference only: the rows' adapters are not trained here."""
    layers = _layers(model)
    validate.require_str("how", how, choices=["grouped", "gathered"])
    names = list(adapter_names) if isinstance(adapter_names, (list, tuple)) else None
    known = set(layers[0][1].lora_A) | {BASE}
    if names is None or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"adapter_names must be a non-empty list of adapter names, one per row, got {adapter_names!r}")
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"adapter_names holds {unknown}, which this model does not have ({sorted(known)})")
    for _, layer in layers:
        layer.rows, layer.how = names, how
    try:
        yield model
    finally:
        for _, layer in layers:
            layer.rows = None


def lora_adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights with the keys of :func:`peft_lab.lora.lora_state_dict` (``<layer>.lora_A.weight``)."""
    layers = _layers(model)
    if name not in layers[0][1].lora_A:
        raise ValueError(f"no adapter named {name!r}; this model has {list(layers[0][1].lora_A)}")
    return {f"{n}.{side}.weight": getattr(layer, side)[name].weight.detach()
            for n, layer in layers for side in ("lora_A", "lora_B")}


def _adapter_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as :func:`lora_adapter_state_dict` writes them, from ours or from PEFT's (``base_model.model.`` in
    front, the adapter's name inside: ``…c_attn.lora_A.story.weight``)."""
    out = {}
    for key, t in state_dict.items():
        key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-1] == "weight":
            parts = parts[:-2] + ["weight"]  # drop the adapter name PEFT puts between lora_A and weight
        out[".".join(parts)] = t
    return out


@torch.no_grad()
def hotswap_adapter(model: nn.Module, name: str, state_dict, alpha: float | None = None) -> nn.Module:
    """Replace adapter ``name``'s weights in place, and its scaling when ``alpha`` is given: no module is created
    or replaced, so a compiled graph of the model stays valid (PEFT's ``hotswap_adapter``). ``state_dict`` is a
    mapping with the keys of :func:`lora_adapter_state_dict` (PEFT's keys are accepted too) or a PEFT adapter
    folder of the same rank and targets. Strict and all or nothing."""
    layers = _layers(model)
    if name not in layers[0][1].lora_A:
        raise ValueError(f"no adapter named {name!r}; this model has {list(layers[0][1].lora_A)}")
    if not isinstance(state_dict, Mapping):
        from .interop import read_adapter_weights
        state_dict = read_adapter_weights(validate.require_path("state_dict", state_dict))
    core.load_adapter_state_dict(_live(model, name), _adapter_keys(state_dict), what=f"adapter {name!r}")
    if alpha is not None:
        for _, layer in layers:
            layer.scaling[name] = lora_scaling(layer.lora_A[name].out_features, alpha)
    return model


def _live(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{n}.{side}.weight": getattr(layer, side)[name].weight for n, layer in _layers(model)
            for side in ("lora_A", "lora_B")}


# ----------------------------------------------------------------------------------------------------------
# Merging adapters (09.4), as PEFT's add_weighted_adapter
# ----------------------------------------------------------------------------------------------------------

def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``density`` fraction of entries largest in magnitude (PEFT's magnitude pruning)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _drop(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (the global torch generator) and rescale by 1/density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _combine(factors: list[torch.Tensor], weights: torch.Tensor, kind: str, density: float) -> torch.Tensor:
    """One side (all A's or all B's) of one layer merged: drop or trim, weight, then add or elect signs."""
    if kind.startswith("dare"):
        factors = [_drop(t, density) for t in factors]
    elif kind == "ties":
        factors = [_trim(t, density) for t in factors]
    stacked = torch.stack(factors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if kind in ("linear", "dare_linear"):
        return weighted.sum(0)
    agree = elect_sign_mask(stacked)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)         # disjoint mean of the agreeing ones


def elect_sign_mask(stacked: torch.Tensor) -> torch.Tensor:
    """TIES' sign election (Yadav et al. 2023, §3, "elect"; PEFT's ``calculate_majority_sign_mask(method=
    "total")``): per entry, the sign of the sum over the adapters (stacked on dim 0; a zero sum elects +), and
    the mask of the entries that carry it — a trimmed (zero) entry carries no sign and is never in the mask."""
    return stacked.sign() == torch.where(stacked.sum(0) >= 0, 1, -1)


@torch.no_grad()
def merge_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], combination: str = "linear",
                   density: float | None = None, new_name: str = "merged") -> nn.Module:
    """A new adapter ``new_name`` from adapters ``names`` with ``weights`` (09.4), as PEFT's
    ``add_weighted_adapter(names, weights, new_name, combination_type=combination, density=density)``: the same
    rank for all but ``"cat"`` (whose rank is their sum), scaling 1 (α = r). ``density`` (the fraction kept) is
    needed by TIES and DARE; DARE draws from the global torch generator: seed it, as for PEFT, to get the same
    masks. The new adapter becomes the active one."""
    layers = _layers(model)
    validate.require_str("combination", combination, choices=COMBINATIONS)
    validate.require_str("new_name", new_name)
    if density is None:
        if combination not in ("linear", "cat"):
            raise ValueError(f"combination={combination!r} needs density, the fraction of entries kept "
                             "(0 < density ≤ 1), e.g. density=0.5")
        density = 1.0
    if isinstance(names, str) or isinstance(weights, (str, int, float)):
        raise TypeError(f"names and weights are lists, one weight per adapter; got {names!r}, {weights!r}")
    name, combination_type = new_name, combination
    adapters, weights = list(names), [validate.require_real("weights", w) for w in weights]
    have = list(layers[0][1].lora_A)
    if not adapters or len(adapters) != len(weights) or any(a not in have for a in adapters):
        raise ValueError(f"adapters must name adapters of this model ({have}), one weight each; got {adapters}, "
                         f"{weights}")
    if name in have:
        raise ValueError(f"an adapter named {name!r} exists already")
    density = validate.require_real("density", density, min=0, max=1, min_open=True)
    bases = core.get_config(model, "multi_lora").bases
    trained_on = {bases.get(a, _base_name(model)) for a in adapters}
    if len(trained_on) > 1:
        raise ValueError(f"adapters {adapters} were trained on different base models {sorted(trained_on)}: a merge "
                         "adds their updates to one base, so it is meaningful only for adapters of the same base")
    ranks = {layers[0][1].lora_A[a].out_features for a in adapters}
    if combination_type != "cat" and len(ranks) > 1:
        raise ValueError(f"combination={combination_type!r} needs adapters of one rank, got ranks "
                         f"{sorted(ranks)}; use 'cat'")
    kind = "linear" if len(adapters) == 1 and combination_type != "cat" else combination_type
    rank = sum(layers[0][1].lora_A[a].out_features for a in adapters) if kind == "cat" else ranks.pop()
    add_lora_adapter(model, name, LoRAConfig(rank, rank, target_modules=tuple(n for n, _ in layers)))
    for _, layer in layers:
        c = [w * layer.scaling[a] for a, w in zip(adapters, weights)]
        A = [layer.lora_A[a].weight for a in adapters]
        B = [layer.lora_B[a].weight for a in adapters]
        if kind == "cat":
            new_a, new_b = torch.cat([ck * a for ck, a in zip(c, A)]), torch.cat(B, dim=1)
        else:
            root = torch.tensor([math.sqrt(abs(ck)) for ck in c], dtype=A[0].dtype, device=A[0].device)
            sign = torch.tensor([1.0 if ck >= 0 else -1.0 for ck in c], dtype=A[0].dtype, device=A[0].device)
            new_a, new_b = _combine(A, root * sign, kind, density), _combine(B, root, kind, density)
        layer.lora_A[name].weight.copy_(new_a)
        layer.lora_B[name].weight.copy_(new_b)
    return model


def _base_name(model: nn.Module) -> str:
    """The base a model's own adapters were trained on, by its last path component ("gpt2", "tiny")."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "tiny"
    return str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _to_peft_named(model: nn.Module, name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's fields and weights of one adapter (the only one when ``name`` is ``None``)."""
    have = lora_adapter_names(model)
    if name is None:
        if len(have) != 1:
            raise ValueError(f"this model holds adapters {have}: pass adapter_name= to say which one to export")
        name = have[0]
    tensors = lora_adapter_state_dict(model, name)
    layers = _layers(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})  # PEFT matches a target by the name's end
    config = core.get_config(model, "multi_lora")[name]
    return peft_fields(config, targets, any(layer.fan_in_fan_out for _, layer in layers)), tensors


def _add_from_peft(model: nn.Module, fields: dict, tensors: Mapping[str, torch.Tensor], name: str) -> nn.Module:
    """Add adapter ``name`` as PEFT's fields say and load its weights (PEFT's ``load_adapter(path, name)``)."""
    config = config_from_peft(fields)
    if config.use_dora or config.init != "default":
        raise ValueError("a named adapter here is plain LoRA (no DoRA, no PiSSA/OLoRA base change); load this "
                         "one alone, without adapter_name")
    add_lora_adapter(model, name, config)
    hotswap_adapter(model, name, tensors)
    base = fields.get("base_model_name_or_path")
    if base:
        _record(model, name, config, str(base).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
    return model


def remove_lora_adapters(model: nn.Module) -> nn.Module:
    """Put the plain layers back (every adapter is dropped; the base was never changed)."""
    return _LAYERS.remove(model, merge=None)


def _configs(model: nn.Module) -> LoRAAdapters:
    _layers(model)
    live = core.get_config(model, "multi_lora")
    copy = LoRAAdapters(live)
    copy.bases.update(live.bases)
    return copy


def _apply(model: nn.Module, configs: LoRAAdapters) -> nn.Module:
    for name, config in configs.items():
        add_lora_adapter(model, name, config)
    return model


_LAYERS.register(
    config_class=LoRAAdapters, apply=_apply,
    disable=_LAYERS.disable, remove=remove_lora_adapters, state_dict=_LAYERS.state_dict,
    load_state_dict=_LAYERS.load_state_dict, config_of=_configs,
    named_peft_type="LORA", to_peft_named=_to_peft_named, add_from_peft=_add_from_peft)
