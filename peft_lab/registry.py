"""Which methods exist: each method module registers one :class:`Method` when it is imported, as PEFT's
``register_peft_method`` does, and everything that works on "any method" reads this registry — switching a
method off (``compare.switched_off``), serving it (``compare.ready_for_inference``), PEFT's file format
(``interop``), the memory calculator (``estimate``) — never a display label or an ``isinstance`` chain.

Adding a method therefore means one module that defines its config, its layer or wrapper, the functions below,
and calls :func:`register`; ``tests/test_registry.py`` does it with a toy method.

The registry sits beside ``core``, below the method modules: it imports none of them.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["Method", "MethodShape", "STAGES", "register", "unregister", "methods", "get", "methods_on",
           "method_on", "require_no_method", "config_method"]

#: The stages of a pre-LN block in forward order (the memory calculator's rule 2, ``estimate``): in the first
#: block a tensor saved at a stage *below* the lowest trainable parameter is not kept. Half stages sit between
#: two: a prefix enters at the attention itself (2), after the q/k/v projection (1), hence 1.5.
STAGES = {"norm": 0, "qkv": 1, "attention": 2, "out_proj": 3, "attn_adapter": 4, "ffn_norm": 5, "ffn_in": 6,
          "activation": 7, "ffn_out": 8, "ffn_adapter": 9}


def _nothing(*_) -> int:
    return 0


@dataclass(frozen=True)
class MethodShape:
    """What one method changes in the memory calculator's count of saved activations (notebook 00 §5,
    ``estimate.activation_elements``), and the fields a calculator spec of this kind takes.

    ``lowest``: the stage (:data:`STAGES`) of its lowest trainable parameter in a block; ``None`` where it is the
    stage of the lowest wrapped layer (LoRA, IA3). ``after_attention(d, m)`` / ``after_ffn(d, m, layer)``:
    floats per token its own modules keep at stage 4 / 9 (``m`` the bottleneck). ``prefix``: P keys and values
    enter every attention; ``prompt``: every layer runs on ``T + P`` positions. ``required`` / ``optional``:
    the spec's fields besides ``kind``.
    """

    lowest: float | None
    after_attention: Callable[[int, int], int] = _nothing
    after_ffn: Callable[[int, int, int], int] = _nothing
    prefix: bool = False
    prompt: bool = False
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One method of the course, as every generic operation sees it.

    * ``name``: the registry key (``"lora"``); ``label``: how messages name it (``"LoRA"``);
    * ``config_class``: its self-validating config; ``apply(model, config) -> model`` (a wrapper for methods that
      wrap the model, like prefix tuning); ``present(model)``: whether ``model`` carries it;
    * ``disable(model)``: a context manager inside which ``model`` computes its base alone; ``remove(model)``;
      ``state_dict(model)`` / ``load_state_dict(model, tensors)``: its own tensors, strict;
      ``config_of(model)``: the config it was applied with;
    * ``serve(model)``: put a trained model in the form it is served, in place (``None``: served as trained),
      and ``served_as``: that form in words (``"merged"``);
    * ``peft_type``: PEFT's name for it (``None`` when PEFT lacks it); ``to_peft(model) -> (config fields,
      tensors)`` and ``from_peft(model, fields) -> model`` (applies the method as PEFT's ``adapter_config.json``
      says; the weights are loaded after) translate PEFT's format; ``peft_key_prefix`` goes before each
      saved key;
    * ``named_peft_type`` with ``to_peft_named(model, name) -> (fields, tensors)`` and
      ``add_from_peft(model, fields, tensors, name) -> model``: for a method that holds several named adapters,
      one of them out and one more in (PEFT's ``adapter_name=``);
    * ``memory``: calculator kind → :class:`MethodShape` (bottleneck adapters have one per placement);
      ``memory_spec(config, model_config) -> dict``: the calculator's spec for one of its configs (targets left
      ``None`` resolved for that architecture), so ``estimate_memory(..., method=LoRAConfig(rank=8))`` works;
    * ``layer_class``: the layer it puts into the model, if it works by wrapping layers.
    """

    name: str
    label: str
    config_class: type
    apply: Callable[[nn.Module, Any], nn.Module]
    present: Callable[[nn.Module], bool]
    disable: Callable[[nn.Module], AbstractContextManager]
    remove: Callable[[nn.Module], nn.Module]
    state_dict: Callable[[nn.Module], dict]
    load_state_dict: Callable[[nn.Module, Mapping], nn.Module]
    config_of: Callable[[nn.Module], Any]
    serve: Callable[[nn.Module], nn.Module] | None = None
    served_as: str = "as trained"
    peft_type: str | None = None
    to_peft: Callable[[nn.Module], tuple] | None = None
    from_peft: Callable[[nn.Module, dict], nn.Module] | None = None
    peft_key_prefix: str = "base_model.model."
    named_peft_type: str | None = None
    to_peft_named: Callable[[nn.Module, str | None], tuple] | None = None
    add_from_peft: Callable[[nn.Module, dict, Mapping, str], nn.Module] | None = None
    memory: Mapping[str, MethodShape] = field(default_factory=dict)
    memory_spec: Callable[[Any, Any], dict] | None = None
    layer_class: type | None = None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a method module calls this once, at import); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a registry.Method, got {type(method).__name__}")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    clash = {k for m in _METHODS.values() if m is not method for k in m.memory} & set(method.memory)
    if clash:
        raise ValueError(f"calculator kind(s) {sorted(clash)} of {method.name!r} belong to another method")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods and take them away again)."""
    _METHODS.pop(name, None)


def methods() -> dict[str, Method]:
    """Every registered method, by name, in the order they registered (the package imports its own first)."""
    importlib.import_module("peft_lab")  # the package's __init__ imports every method module
    return dict(_METHODS)


def get(name: str) -> Method:
    """The method called ``name``; ``ValueError`` naming the known ones otherwise."""
    known = methods()
    if name not in known:
        raise ValueError(f"no method named {name!r}; registered: {sorted(known)}")
    return known[name]


def methods_on(model: nn.Module) -> list[Method]:
    """The registered methods that ``model`` carries (none, one, or — if built by hand — several)."""
    return [m for m in methods().values() if m.present(model)]


def method_on(model: nn.Module) -> Method:
    """The one method ``model`` carries; ``ValueError`` when it carries none or several."""
    found = methods_on(model)
    if len(found) != 1:
        what = "no method of peft_lab" if not found else f"several methods ({', '.join(m.label for m in found)})"
        raise ValueError(f"this model carries {what}; expected exactly one")
    return found[0]


def config_method(config: Any) -> Method | None:
    """The registered method whose config class ``config`` is an instance of, or ``None``."""
    return next((m for m in methods().values() if isinstance(config, m.config_class)), None)


def require_no_method(model: nn.Module, applying: str) -> None:
    """The one stacking rule of the package: a model carries one method at a time. ``applying`` (e.g.
    ``"LoRA"``) is refused on a model that already carries any method, its own included, with the call that
    removes it. (Two methods on one model would train together, and PEFT's file could hold only one of them.)"""
    found = methods_on(model)
    if found:
        names = ", ".join(m.label for m in found)
        removes = " or ".join(f"peft_lab.{m.remove.__name__}(model)" for m in found)
        raise ValueError(f"this model already carries {names}; peft_lab puts one method on a model at a time, so "
                         f"{applying} cannot be added. Call {removes} first, or start from a fresh copy of the "
                         "base model")
