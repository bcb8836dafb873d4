"""What every method shares: choosing layers, swapping modules, freezing, the config record, switching an
adapter off, undoing a failed load, and its state dict with a strict loader (notebook 02, "Build it as a
package").

A method module (``lora``, ``adapters``, ...) defines its layer class as a subclass of :class:`AdapterLayer`
and builds on the functions here; it never imports another method module. Notebook 02 ("Build it as a
package") walks through how ``peft_lab.lora`` uses them.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import validate

__all__ = ["Switchable", "AdapterLayer", "matches_target", "module_names", "ends_with_module", "resolve_targets",
           "describe_layers", "replace_module",
           "freeze", "find_layers", "require_layers", "record_config", "get_config", "clear_config",
           "disabled", "adapter_state_dict", "load_adapter_state_dict", "all_adapter_layers",
           "require_adapters_active", "require_untied", "no_match_hint", "rollback_on_error", "adapter_dtype",
           "fill_seeded", "stored_weight", "StoredWeights", "LayerMethod", "eval_mode"]


class Switchable(nn.Module):
    """What every method's trainable part says about itself, so that training can refuse to run when it
    would update nothing: ``disabled`` (inside a ``disable_...`` block the method computes the base alone)
    and ``merged`` (the update lives inside the base weight). ``merged_fix`` is what the user calls to undo a
    merge (a method that can merge sets it, e.g. ``"unmerge_lora(model)"``)."""

    merged_fix: str = ""

    def __init__(self):
        super().__init__()
        self.disabled = False
        self.merged = False


class AdapterLayer(Switchable):
    """Base of every method's layer: the :class:`Switchable` flags, the wrapped ``base_layer``, and the names of
    the submodules that hold the adapter's own (trainable) parameters, e.g. ``("lora_A", "lora_B")``.
    :meth:`adapter_tensors` names those tensors; they become the keys of :func:`adapter_state_dict`."""

    adapter_modules: tuple[str, ...] = ()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's own tensors by key relative to the layer (``"lora_A.weight"``); a layer whose tensor is
        not in a submodule (IA3's ``ia3_l``, DoRA's magnitude) adds it here."""
        return {f"{sub}.{pname}": t for sub in self.adapter_modules
                for pname, t in getattr(self, sub).named_parameters()}


class StoredWeights:
    """Mixin for a base layer that stores its weight in buffers rather than a parameter (an NF4 layer,
    ``peft_lab.qlora``): :meth:`stored_tensors` lists them, so that ``measure`` counts them as weights without
    knowing the layer."""

    def stored_tensors(self) -> list[torch.Tensor]:
        return list(self.buffers(recurse=False))


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a method's own weights on a base of ``dtype``: half-precision bases (fp16, bf16) get
    float32 adapters, as PEFT does by default (``autocast_adapter_dtype=True``); others their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------------------
# Choosing layers (PEFT's ``target_modules`` rule)
# ----------------------------------------------------------------------------------------------------------

def matches_target(name: str, target_modules: Sequence[str] | str) -> bool:
    """Whether the module called ``name`` (as in ``model.named_modules()``) is a target — PEFT's rule.

    * a list of strings: ``name`` equals an entry or ends with ``"." + entry``. So ``"c_attn"`` matches
      ``transformer.h.0.attn.c_attn``; ``"c_proj"`` matches *both* ``attn.c_proj`` and ``mlp.c_proj``;
      ``"attn.c_proj"`` only the attention one. Partial words do not match (``"attn"`` ≠ ``c_attn``).
    * one string: a regular expression that must match the whole name (``re.fullmatch``), e.g.
      ``r".*\\.h\\.[01]\\.attn\\.c_attn"`` for the first two blocks only. So ``"c_attn"`` as one string
      matches no nested module; :func:`no_match_hint` then tells the user to pass ``["c_attn"]``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def describe_layers(model: nn.Module, layer_types: tuple[type, ...]) -> str:
    """One sentence listing the layers of ``layer_types`` by name suffix: the hint in "matched nothing" errors."""
    names = [n for n, m in model.named_modules() if isinstance(m, layer_types)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]!r})" if names else ""
    return f"linear layers in this model, by name suffix: {suffixes}{example}"


def resolve_targets(model: nn.Module, target_modules, defaults: Mapping[str, Sequence[str]],
                    layer_types: tuple[type, ...]) -> tuple[str, ...] | str:
    """``target_modules`` checked and normalised: ``None`` → ``defaults[model.config.model_type]``; a list,
    tuple or set → a tuple of names; a string → a regular expression (it must compile)."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(
                f"no default target_modules for model type {model_type!r}; pass target_modules=[...] "
                f"explicitly. {describe_layers(model, layer_types)}")
        return tuple(defaults[model_type])
    return module_names(target_modules, "target_modules")


def module_names(value, argument: str, allow_empty: bool = False) -> tuple[str, ...] | str:
    """A module-name argument (``target_modules``, ``skip_modules``, ...) checked and normalised, the same
    way everywhere: a list, tuple or set → a tuple of names (suffix rule of :func:`matches_target`); one
    string → a regular expression over the whole name (it must compile). ``tuple("lm_head")`` would be seven
    one-letter names, which is why no caller converts with ``tuple`` itself."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{argument} is an empty string; pass a list of module names such as "
                             f"['c_attn'], or a regular expression over the whole module name")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{argument}={value!r} is one string, which is read as a regular expression, "
                             f"and it is not a valid one ({err}); to list module names pass a list, "
                             "e.g. ['c_attn']") from None
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{argument} must be a list of module names or a regex string, got "
                        f"{validate.describe(value)}")
    names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    if not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{argument} must be a list of non-empty strings, got {value!r}")
    if not names and not allow_empty:
        raise ValueError(f"{argument} is empty; pass at least one module name such as ['c_attn']")
    return names


def ends_with_module(name: str, modules: Sequence[str] | str) -> bool:
    """PEFT's rule for IA3's ``feedforward_modules``, not quite :func:`matches_target`: a regex must match the
    whole name; a list entry matches when ``name`` ends with it (no dot required)."""
    if isinstance(modules, str):
        return re.fullmatch(modules, name) is not None
    return any(name.endswith(f) for f in modules)


def no_match_hint(model: nn.Module, targets: tuple[str, ...] | str, layer_types: tuple[type, ...]) -> str:
    """The message for ``targets`` that matched no module: the layers present, and, for one string that is
    a module's short name (``"c_attn"``), the rule that a string is a regular expression over the *full*
    name and the fix ``["c_attn"]``."""
    message = f"target_modules {targets!r} matched no module. {describe_layers(model, layer_types)}"
    if isinstance(targets, str):
        names = [n for n, _ in model.named_modules() if n and matches_target(n, [targets])]
        if names:
            message += (f". A single string is a regular expression that must match the whole module name "
                        f"(PEFT's rule), so {targets!r} does not match {names[0]!r}; to target every module "
                        f"named {targets!r} pass a list: target_modules=[{targets!r}]")
    return message


# ----------------------------------------------------------------------------------------------------------
# Changing the model
# ----------------------------------------------------------------------------------------------------------

def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` was (``"transformer.h.0.attn.c_attn"``)."""
    validate.require_module("model", model)
    validate.require_str("name", name)
    validate.require_module("new", new)
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"name={name!r} is not a submodule of this model; names are as in "
                         "model.named_modules(), e.g. 'transformer.h.0.attn.c_attn'") from None
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def stored_weight(layer: nn.Module) -> nn.Parameter:
    """The base layer's weight for a merge to write into; refused when it is not a stored parameter (an NF4
    layer, ``peft_lab.qlora``, dequantizes its weight on every read, so a merged update would be lost)."""
    w = layer.weight
    if not isinstance(w, nn.Parameter):
        raise TypeError(f"cannot merge into a {type(layer).__name__}: its weight is not a stored float "
                        "parameter, so the update would be lost. Turn the base back into float layers first "
                        "(peft_lab.dequantize_model(model)), or keep the adapter unmerged")
    return w


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter: the base stays as pretrained; adapters added after this
    call are the only trainable parameters."""
    return validate.require_module("model", model).requires_grad_(False)


def find_layers(model: nn.Module, layer_type: type) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every submodule of type ``layer_type``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, layer_type):
            yield name, module


def require_layers(model: nn.Module, layer_type: type, method: str, apply_hint: str) -> list[tuple[str, nn.Module]]:
    """:func:`find_layers` as a list, or a ``ValueError`` saying the model has no ``method`` layers and to
    call ``apply_hint`` first."""
    validate.require_module("model", model)
    layers = list(find_layers(model, layer_type))
    if not layers:
        raise ValueError(f"this model has no {method} layers; call {apply_hint} first")
    return layers


# The settings a method was applied with live on the model as one attribute per method.
def _config_attr(method: str) -> str:
    return f"_peft_lab_{method}_config"


def record_config(model: nn.Module, method: str, config) -> None:
    """Remember the settings ``method`` was applied with (read back by :func:`get_config`, exported)."""
    setattr(model, _config_attr(method), config)


def get_config(model: nn.Module, method: str):
    """The settings recorded by :func:`record_config`, or ``None``."""
    return getattr(model, _config_attr(method), None)


def clear_config(model: nn.Module, method: str) -> None:
    if hasattr(model, _config_attr(method)):
        delattr(model, _config_attr(method))


def all_adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every adapter layer of any method in ``model`` (a list; each method has its own ``*_layers``)."""
    return list(find_layers(model, AdapterLayer))


def require_adapters_active(model: nn.Module, action: str) -> None:
    """Refuse ``action`` (e.g. ``"train"``) while a method's trainable part (any :class:`Switchable`: an
    adapter layer, a prefix wrapper) is switched off (inside a ``disable_...`` block) or merged into its base
    weight: its parameters would then receive no gradient, and the action would silently do nothing to them."""
    parts = [(n or type(m).__name__, m) for n, m in model.named_modules() if isinstance(m, Switchable)]
    off = [n for n, part in parts if part.disabled]
    if off:
        raise ValueError(f"cannot {action} inside a `with disable_...(model):` block: the method is switched "
                         f"off there (e.g. {off[0]!r}); {action} after the block ends")
    merged = [(n, part) for n, part in parts if part.merged]
    if merged:
        name, part = merged[0]
        raise ValueError(f"cannot {action} a model whose adapters are merged into the base weights (e.g. "
                         f"{name!r}): the adapter would get no gradient. Call {part.merged_fix or 'unmerge'} "
                         "first, or apply a fresh adapter")


@contextmanager
def rollback_on_error(model: nn.Module):
    """Inside the block a loader may change ``model`` freely; if the block raises, ``model`` is put back
    exactly as it came — the same submodule objects in the same places, the same values (of the methods'
    tensors already there; the base's are never written by a loader), the same ``requires_grad``, the same
    train/eval mode and the same config records — and the error propagates. On success nothing is undone.
    Every loader (``load_adapters``, ``import_peft_adapter``, ``import_adapterhub_adapter``) runs inside it, so
    none needs its own clean-up."""
    children = {name: dict(module._modules) for name, module in model.named_modules(remove_duplicate=False)}
    owners = {name: module for name, module in model.named_modules(remove_duplicate=False)}
    # a loader writes only into a method's tensors (the base's are never copied into): snapshot those
    own = [t for m in model.modules() if isinstance(m, Switchable) for t in [*m.parameters(), *m.buffers()]]
    tensors = {id(t): (t, t.detach().clone()) for t in own}
    grads = {id(p): (p, p.requires_grad) for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]
    records = {k: val for k, val in vars(model).items() if k.startswith("_peft_lab_")}
    try:
        yield model
    except BaseException:
        for name, module in owners.items():
            module._modules.clear()
            module._modules.update(children[name])
        with torch.no_grad():
            for t, saved in tensors.values():
                if t.shape == saved.shape:
                    t.copy_(saved)
        for p, flag in grads.values():
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
        for k in [k for k in vars(model) if k.startswith("_peft_lab_")]:
            delattr(model, k)
        for k, val in records.items():
            setattr(model, k, val)
        raise


def require_untied(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse target layers whose weight is shared with another module (GPT-2's ``lm_head`` is the input
    embedding ``wte``): merging an update into one would change the other, so the merged model would not be
    the trained one."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        shared = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"] if weight is not None else []
        if shared:
            raise ValueError(f"target_modules selects {name!r}, whose weight is tied to {shared[0]!r} (shared "
                             "input and output embeddings); an adapter there would change both when merged. "
                             f"Leave {name!r} out of target_modules")


@contextmanager
def disabled(layers: Iterable[AdapterLayer]):
    """Inside the block every layer in ``layers`` computes its base alone; the old switches come back after."""
    layers = list(layers)
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


# ----------------------------------------------------------------------------------------------------------
# The adapter's own weights
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def fill_seeded(tensors: Mapping[str, torch.Tensor], seed: int, std: float) -> None:
    """Give every tensor of ``tensors`` (name → tensor, taken in sorted name order) fresh values
    N(0, ``std``²) from a generator seeded with ``seed``. Used wherever a method's weights must be non-trivial
    for an equality check: at init LoRA's B and an adapter's W_up are zero, and a comparison would pass
    whatever the layer computes."""
    g = torch.Generator().manual_seed(seed)
    for _, t in sorted(tensors.items()):
        t.copy_(torch.randn(t.shape, generator=g) * std)


def adapter_state_dict(layers: Iterable[tuple[str, AdapterLayer]]) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, named ``"<layer>.<adapter module>.<parameter>"`` (e.g.
    ``transformer.h.0.attn.c_attn.lora_A.weight``). Detached and sharing storage, like ``state_dict``."""
    return {f"{name}.{key}": t.detach() for name, layer in layers for key, t in layer.adapter_tensors().items()}


def _extra_prefix(missing: list[str], unexpected: list[str]) -> str:
    """The one prefix that turns every missing key into an unexpected one (``"base_model.model."`` for a
    PEFT file's keys), or ``""``."""
    if not missing or len(missing) != len(unexpected):
        return ""
    candidates = {u[:-len(m)] for u in unexpected[:1] for m in missing if u.endswith("." + m)}
    return next((p for p in candidates if {p + m for m in missing} == set(unexpected)), "")


@torch.no_grad()
def load_adapter_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                            what: str = "adapter") -> None:
    """Copy ``state_dict`` into the tensors of ``expected`` (as returned by :func:`adapter_state_dict`).

    Strict: every key must be present, no extra key, each value a tensor of the same shape. Everything is
    checked before anything is copied, so a failed call changes nothing.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {validate.describe(state_dict)}")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    prefix = _extra_prefix(missing, unexpected)
    if prefix:
        peft = ("; this is PEFT's file format: read a PEFT folder with peft_lab.import_peft_adapter(model, folder)"
                if prefix == "base_model.model." else "")
        raise ValueError(f"{what} weights do not fit this model as given: every key carries the extra prefix "
                         f"{prefix!r} (e.g. {unexpected[0]!r} for {missing[0]!r}){peft}; or strip the prefix")
    if missing or unexpected:
        raise ValueError(f"{what} weights do not fit this model: missing keys {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''} (was it made for another "
                         "architecture or other settings?)")
    for key, target in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {validate.describe(value)}; convert with "
                            "torch.as_tensor(...)")
        if not (value.is_floating_point() or value.is_complex()) and target.is_floating_point():
            raise TypeError(f"state_dict[{key!r}] must hold floating-point weights, got dtype {value.dtype}")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch for {key}: the file has {tuple(value.shape)}, this model needs "
                             f"{tuple(target.shape)} (made for another model size or setting?)")
    for key, target in expected.items():
        target.copy_(state_dict[key])


@contextmanager
def eval_mode(model: nn.Module):
    """Inside the block ``model`` is in eval mode (no dropout); its train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Whole-model operations, written once (PEFT's BaseTuner does this for its tuners)
# ----------------------------------------------------------------------------------------------------------

class LayerMethod:
    """The whole-model operations of a method whose trainable part is layers of one :class:`AdapterLayer`
    subclass: find the targets, wrap them, merge, unmerge, switch off, remove, and the state dict with its
    strict loader. A method module makes one (``lora._LAYERS = LayerMethod(...)``) and its public functions
    (``merge_lora``, ``disable_ia3``, ...) call it, so each rule lives here once.

    ``suffix``: the public functions' common suffix (``"lora"`` for ``apply_lora``, ``merge_lora``, ...), which
    messages name; ``supported``: the layer types it may wrap; ``companions``: other module types it puts into
    the model that remove must unwrap too (bottleneck adapters' ``ResidualTap``); ``apply_hint``: the call that
    puts the method on a model, as messages name it (``apply_<suffix>(model, ...)`` unless given).
    """

    def __init__(self, name: str, layer_class: type, label: str, suffix: str,
                 supported: tuple[type, ...] = (), companions: tuple[type, ...] = (), apply_hint: str | None = None):
        self.name, self.layer_class, self.label, self.suffix = name, layer_class, label, suffix
        self.supported, self.companions = supported, companions
        self.apply_hint = apply_hint or f"apply_{suffix}(model, ...)"

    def register(self, **fields):
        """Register the method (:func:`peft_lab.registry.register`); its name, label, layer class and
        ``present`` come from here, the rest (``config_class``, ``apply``, ...) from ``fields``."""
        from . import registry
        fields = {"name": self.name, "label": self.label, "layer_class": self.layer_class, "present": self.present,
                  **fields}
        return registry.register(registry.Method(**fields))

    def layers(self, model: nn.Module) -> list[tuple[str, AdapterLayer]]:
        """``(name, layer)`` of every layer of this method, in module order."""
        return list(find_layers(validate.require_module("model", model), self.layer_class))

    def present(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Module) and any(True for _ in find_layers(model, self.layer_class))

    def require(self, model: nn.Module, action: str | None = None) -> list[tuple[str, AdapterLayer]]:
        """The layers, or ``ValueError`` when there are none; with ``action``, refused inside the method's disable
        block (which restores the layers' merged state when it ends, undoing or doubling the action)."""
        layers = require_layers(model, self.layer_class, self.label, self.apply_hint)
        if action and any(layer.disabled for _, layer in layers):
            raise ValueError(f"{action} inside `with disable_{self.suffix}(model):` is not allowed: the block "
                             f"restores the layers' merged state when it ends. Call {action} after the block")
        return layers

    def match_targets(self, model: nn.Module, target_modules, defaults: Mapping[str, Sequence[str]]):
        """``target_modules`` resolved (:func:`resolve_targets`) and the ``(name, module)`` pairs it matches:
        at least one, each of a supported type, none tied to another module (:func:`require_untied`)."""
        targets = resolve_targets(model, target_modules, defaults, self.supported)
        matched = [(n, m) for n, m in model.named_modules() if n and matches_target(n, targets)]
        if not matched:
            raise ValueError(no_match_hint(model, targets, self.supported))
        wrong = [(n, type(m).__name__) for n, m in matched if not isinstance(m, self.supported)]
        if wrong:
            listed = ", ".join(f"{n} ({t})" for n, t in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
            kinds = " and ".join(("nn." if t.__module__.startswith("torch.") else "") + t.__name__
                                 for t in self.supported)
            raise TypeError(f"{self.label} here wraps {kinds} layers only, but target_modules {targets!r} "
                            f"matched {listed}. {describe_layers(model, self.supported)}")
        require_untied(model, [n for n, _ in matched])
        return targets, matched

    def install(self, model: nn.Module, wrapped: Iterable[tuple[str, nn.Module]], config) -> nn.Module:
        """Freeze the base, put each ``(name, layer)`` in place, record ``config``. Build every layer before
        calling this: then a failure while building leaves the model as it came."""
        freeze(model)
        for name, layer in wrapped:
            replace_module(model, name, layer)
        record_config(model, self.name, config)
        return model

    def recorded_config(self, model: nn.Module):
        """The config recorded at apply time, or ``None`` (layers placed by hand)."""
        self.require(model)
        return get_config(model, self.name)

    def merge(self, model: nn.Module) -> nn.Module:
        for _, layer in self.require(model, f"merge_{self.suffix}"):
            layer.merge()
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        for _, layer in self.require(model, f"unmerge_{self.suffix}"):
            layer.unmerge()
        return model

    @contextmanager
    def disable(self, model: nn.Module):
        """Inside the block the model computes its base alone. Unmerged layers skip their update, so the output
        equals the base model's exactly; merged layers are unmerged on entry and merged again on exit."""
        layers = [layer for _, layer in self.require(model)]
        merged = [layer for layer in layers if layer.merged]
        for layer in merged:
            layer.unmerge()
        try:
            with disabled(layers):
                yield model
        finally:
            for layer in merged:
                layer.merge()

    def remove(self, model: nn.Module, merge: bool | None) -> nn.Module:
        """Put the plain layers back. ``merge=True`` keeps the update inside the base weight, ``False`` drops it
        (unmerging a merged layer), ``None`` for a method that cannot merge. Base parameters stay frozen."""
        layers = self.require(model, f"remove_{self.suffix}")
        for name, layer in layers:
            if merge:
                layer.merge()
            elif merge is False and layer.merged:
                layer.unmerge()
        for name, module in list(model.named_modules()):
            if isinstance(module, (self.layer_class, *self.companions)):
                replace_module(model, name, module.base_layer)
        clear_config(model, self.name)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.require(model))

    def load_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """Strict, all or nothing (:func:`load_adapter_state_dict`); merged layers are refused (the update would
        then not be the one inside the weight)."""
        layers = self.require(model)
        merged = [layer for _, layer in layers if layer.merged]
        if merged:
            raise ValueError(f"cannot load {self.label} weights into merged layers; call {merged[0].merged_fix} "
                             "first")
        load_adapter_state_dict(adapter_state_dict(layers), state_dict, what=self.label)
        return model
