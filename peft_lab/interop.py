"""PEFT's on-disk adapter format, in and out (notebook 02, "Save, load, and share with PEFT").

A PEFT adapter is a directory with two files:

* ``adapter_config.json`` — the method (``peft_type``) and its settings, e.g. for LoRA ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``fan_in_fan_out``, ``use_rslora``, ``use_dora``; for IA3
  ``target_modules``, ``feedforward_modules``, ``fan_in_fan_out``;
* ``adapter_model.safetensors`` — only the adapter's tensors, named like the model's modules with the prefix
  ``base_model.model.`` and without the adapter name, e.g.
  ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` (DoRA adds ``...c_attn.lora_magnitude_vector``,
  IA3 saves ``...c_attn.ia3_l``).

:func:`export_peft_adapter` writes that directory from a peft_lab model, so that
``peft.PeftModel.from_pretrained(base, path)`` loads it; :func:`import_peft_adapter` reads a directory
written by ``get_peft_model(...).save_pretrained(path)`` (or by us). Only safetensors is read or written —
never pickle (``adapter_model.bin``), which can run arbitrary code when loaded.

Both functions dispatch on the method registry (:mod:`peft_lab.registry`): each method module registers its
PEFT ``peft_type`` and how its settings map onto PEFT's fields, so a new method touches nothing here.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import core, registry, validate
from .paths import atomic_path

__all__ = ["export_peft_adapter", "import_peft_adapter", "read_adapter_config", "read_adapter_weights",
           "peft_types", "CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's PeftModel → LoraModel → the transformers model


def peft_types() -> dict[str, registry.Method]:
    """PEFT ``peft_type`` → the registered method that reads and writes it (each method module says how its
    settings map onto PEFT's ``adapter_config.json``: ``to_peft`` and ``from_peft`` in its registry entry)."""
    return {m.peft_type: m for m in registry.methods().values() if m.peft_type and m.to_peft and m.from_peft}


@contextmanager
def _explain_misfit(config: dict):
    """Re-raise a method's refusal of the model as "this adapter does not fit the model", naming the model the
    adapter was made for."""
    try:
        yield
    except ValueError as err:
        base = config.get("base_model_name_or_path")
        raise ValueError(f"this adapter does not fit the model (made for {base!r}, another architecture?): "
                         f"{err}") from err
    except TypeError as err:
        raise TypeError(f"this adapter does not fit the model: {err}") from err


# ----------------------------------------------------------------------------------------------------------
# The two public functions and the readers they share
# ----------------------------------------------------------------------------------------------------------

def export_peft_adapter(model: nn.Module, path, adapter_name: str | None = None, task_type: str = "CAUSAL_LM"
                        ) -> Path:
    """Write ``model``'s adapter to the directory ``path`` in PEFT's format; return the directory.

    For a model holding several named LoRA adapters (:func:`peft_lab.add_lora_adapter`, notebook 09)
    ``adapter_name`` says which one (it may be left out when there is only one); the folder holds that adapter
    alone, as PEFT's ``save_pretrained(path, selected_adapters=[name])`` writes it for the default name.

    ``peft.PeftModel.from_pretrained(base_model, path)`` then reproduces the model's outputs.
    ``base_model_name_or_path`` comes from ``model.config._name_or_path`` (``"tiny"`` when empty). ``~`` in
    ``path`` is expanded; ``""`` is refused. Both files are written into a temporary folder beside ``path``
    and moved into place only when both are complete, so a failed call leaves ``path`` as it was.
    """
    validate.require_module("model", model)
    out = validate.require_path("path", path)
    validate.require_str("task_type", task_type)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"path={str(path)!r} is an existing file; an adapter is a folder: pass a folder "
                              "name (it is created if missing)")
    found = registry.methods_on(model)
    if not found:
        raise ValueError(f"this model carries no adapter to export (supported: {sorted(peft_types())}); "
                         "apply one first, e.g. apply_lora(model)")
    if len(found) > 1:
        raise ValueError(f"this model carries several methods {[m.label for m in found]}; export supports one "
                         "at a time")
    method = found[0]
    if method.to_peft_named is not None:
        if adapter_name is not None:
            validate.require_str("adapter_name", adapter_name)
        fields, tensors = method.to_peft_named(model, adapter_name)
        return _write_peft(model, out, method.named_peft_type, fields, tensors, task_type, method.peft_key_prefix)
    if adapter_name not in (None, "default"):
        raise ValueError(f"adapter_name={adapter_name!r}: this model's {method.label} has no named adapters (add "
                         "them with peft_lab.add_lora_adapter); leave adapter_name out")
    if method.peft_type not in peft_types():
        raise ValueError(f"PEFT has no format for {method.label} (it exports {sorted(peft_types())})"
                         + ("; AdapterHub's format has it: peft_lab.export_adapterhub_adapter"
                            if method.name == "bottleneck" else ""))
    fields, tensors = method.to_peft(model)
    return _write_peft(model, out, method.peft_type, fields, tensors, task_type, method.peft_key_prefix)


def _write_peft(model: nn.Module, out: Path, peft_type: str, fields: dict, tensors: dict, task_type: str,
                key_prefix: str) -> Path:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "tiny"
    config = {"peft_type": peft_type, "task_type": task_type, "base_model_name_or_path": str(name),
              "inference_mode": True, "revision": None, **fields}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # fails here, before any file is touched
    # key_prefix: "base_model.model." for LoRA, none for prompt learning
    weights = {key_prefix + k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    _write_adapter_dir(out, text, weights)
    return out


def _write_adapter_dir(out: Path, config_text: str, weights: dict[str, torch.Tensor]) -> None:
    """Both files at once (:func:`peft_lab.paths.atomic_path` with ``folder=True``)."""
    from safetensors.torch import save_file
    with atomic_path(out, folder=True) as tmp:
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")


def read_adapter_config(path) -> dict:
    """The parsed ``adapter_config.json`` of an adapter directory, with clear errors for missing/bad files."""
    folder = validate.require_path("path", path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"path={str(path)!r} is a file; a PEFT adapter is a folder holding {CONFIG_NAME} "
                                 f"and {WEIGHTS_NAME}: pass that folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory {folder} does not exist (path={str(path)!r})")
    file = folder / CONFIG_NAME
    if not file.is_file():
        inner = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        hint = (f"; it has {[f'{n}/{CONFIG_NAME}' for n in inner]}: PEFT saves an adapter with a name other than "
                f"'default' in a subfolder of that name, so pass path={str(folder / inner[0])!r}") if inner else ""
        raise FileNotFoundError(f"{file} is missing: an adapter directory needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}{hint}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_adapter_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (prefix ``base_model.model.`` removed). Never unpickles."""
    folder = validate.require_path("path", path)
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        pickled = [p.name for p in (folder / "adapter_model.bin", folder / "adapter_model.pt") if p.is_file()]
        hint = (f" Found {pickled[0]}: pickle files are not loaded (unsafe); re-save the adapter with "
                "save_pretrained(path, safe_serialization=True).") if pickled else ""
        raise FileNotFoundError(f"{file} is missing.{hint}")
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    return {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in tensors.items()}


def import_peft_adapter(model: nn.Module, path, adapter_name: str | None = None) -> nn.Module:
    """Load the PEFT adapter directory ``path`` into ``model`` (a plain base model); return ``model``.

    With ``adapter_name`` a LoRA adapter is added under that name, beside the model's other named adapters
    (:func:`peft_lab.add_lora_adapter`; a plain model is wrapped first), as PEFT's ``load_adapter(path,
    adapter_name)``; it becomes the active one.

    The adapter's own settings are applied (for LoRA: ``apply_lora`` with ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``use_rslora``, ``use_dora``; for IA3: ``apply_ia3`` with
    ``target_modules``, ``feedforward_modules``), then its weights are copied in. On failure the
    model is left exactly as it came (:func:`peft_lab.core.rollback_on_error`).
    """
    validate.require_module("model", model)
    path = validate.require_path("path", path)
    config = read_adapter_config(path)
    peft_type = config.get("peft_type")
    known = peft_types()
    if peft_type not in known:
        raise ValueError(f"unsupported peft_type {peft_type!r} in {Path(path) / CONFIG_NAME}; "
                         f"peft_lab imports {sorted(known)}")
    tensors = read_adapter_weights(path)
    bad = [k for k, v in tensors.items() if not torch.is_floating_point(v)]
    if bad:
        raise TypeError(f"{WEIGHTS_NAME} holds non-float tensors {bad[:3]}: adapter weights are floating point")
    if adapter_name is not None:
        validate.require_str("adapter_name", adapter_name)
        named = {m.named_peft_type: m for m in registry.methods().values() if m.add_from_peft}
        if peft_type not in named:
            raise ValueError(f"adapter_name= adds a named adapter, which peft_lab supports for {sorted(named)} "
                             f"adapters; this one is {peft_type}: leave adapter_name out")
        with core.rollback_on_error(model):
            with _explain_misfit(config):
                return named[peft_type].add_from_peft(model, config, tensors, adapter_name)
    method = known[peft_type]
    with core.rollback_on_error(model):
        with _explain_misfit(config):
            model = method.from_peft(model, config)
        return method.load_state_dict(model, tensors)
