"""What every method shares: choosing layers, swapping modules, freezing, the config record, switching an
adapter off, and its state dict with a strict loader (GUIDE §1, "core").

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

__all__ = ["AdapterLayer", "matches_target", "resolve_targets", "describe_layers", "replace_module",
           "freeze", "find_layers", "require_layers", "record_config", "get_config", "clear_config",
           "disabled", "adapter_state_dict", "load_adapter_state_dict"]


class AdapterLayer(nn.Module):
    """Base of every method's layer: a ``disabled`` switch and the names of the submodules that hold the
    adapter's own (trainable) parameters, e.g. ``("lora_A", "lora_B")``. Those names become the keys of
    :func:`adapter_state_dict`."""

    adapter_modules: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.disabled = False


# ----------------------------------------------------------------------------------------------------------
# Choosing layers (PEFT's ``target_modules`` rule)
# ----------------------------------------------------------------------------------------------------------

def matches_target(name: str, target_modules: Sequence[str] | str) -> bool:
    """Whether the module called ``name`` (as in ``model.named_modules()``) is a target — PEFT's rule.

    * a list of strings: ``name`` equals an entry or ends with ``"." + entry``. So ``"c_attn"`` matches
      ``transformer.h.0.attn.c_attn``; ``"c_proj"`` matches *both* ``attn.c_proj`` and ``mlp.c_proj``;
      ``"attn.c_proj"`` only the attention one. Partial words do not match (``"attn"`` ≠ ``c_attn``).
    * one string: a regular expression that must match the whole name (``re.fullmatch``), e.g.
      ``r".*\\.h\\.[01]\\.attn\\.c_attn"`` for the first two blocks only.
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
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is an empty string")
        return target_modules
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(f"target_modules must be None, a list of module names or a regex string, "
                        f"got {type(target_modules).__name__}")
    targets = tuple(sorted(target_modules)) if isinstance(target_modules, (set, frozenset)) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of non-empty strings, got {target_modules!r}")
    return targets


# ----------------------------------------------------------------------------------------------------------
# Changing the model
# ----------------------------------------------------------------------------------------------------------

def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` was (``"transformer.h.0.attn.c_attn"``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter: the base stays as pretrained; adapters added after this
    call are the only trainable parameters."""
    return model.requires_grad_(False)


def find_layers(model: nn.Module, layer_type: type) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every submodule of type ``layer_type``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, layer_type):
            yield name, module


def require_layers(model: nn.Module, layer_type: type, method: str, apply_hint: str) -> list[tuple[str, nn.Module]]:
    """:func:`find_layers` as a list, or a ``ValueError`` saying the model has no ``method`` layers and to
    call ``apply_hint`` first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
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

def adapter_state_dict(layers: Iterable[tuple[str, AdapterLayer]]) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, named ``"<layer>.<adapter module>.<parameter>"`` (e.g.
    ``transformer.h.0.attn.c_attn.lora_A.weight``). Detached and sharing storage, like ``state_dict``."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        for sub in layer.adapter_modules:
            for pname, tensor in getattr(layer, sub).named_parameters():
                out[f"{name}.{sub}.{pname}"] = tensor.detach()
    return out


@torch.no_grad()
def load_adapter_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                            what: str = "adapter") -> None:
    """Copy ``state_dict`` into the tensors of ``expected`` (as returned by :func:`adapter_state_dict`).

    Strict: every key must be present, no extra key, each value a tensor of the same shape. Everything is
    checked before anything is copied, so a failed call changes nothing.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} weights do not fit this model: missing keys {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''} (was it made for another "
                         "architecture or other settings?)")
    for key, target in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch for {key}: the file has {tuple(value.shape)}, this model needs "
                             f"{tuple(target.shape)} (made for another model size or setting?)")
    for key, target in expected.items():
        target.copy_(state_dict[key])
