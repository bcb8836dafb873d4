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

Each method registers a :class:`Method` in :data:`PEFT_TYPES` under its PEFT ``peft_type``; both functions
dispatch on it, so a new method (prefix tuning, prompt tuning, ...) adds an entry and nothing else.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import core, ia3, lora, prefix, validate
from .paths import atomic_path

__all__ = ["export_peft_adapter", "import_peft_adapter", "read_adapter_config", "read_adapter_weights",
           "PEFT_TYPES", "Method", "CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's PeftModel → LoraModel → the transformers model


@dataclass(frozen=True)
class Method:
    """How one PEFT method travels: ``detect(model)`` says whether the model carries it;
    ``export(model) -> (config fields, tensors without prefix)``; ``load(model, config, tensors) -> model``
    (prefix and prompt tuning return the wrapper around ``model``); ``key_prefix`` goes before each saved key."""

    detect: Callable[[nn.Module], bool]
    export: Callable[[nn.Module], "tuple[dict, dict[str, torch.Tensor]]"]
    load: Callable[[nn.Module, dict, "dict[str, torch.Tensor]"], nn.Module]
    key_prefix: str = KEY_PREFIX  # prompt learning (prefix/prompt tuning) saves its one tensor without it


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------

def _has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora.lora_layers(model))


def _export_lora(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    config = lora.lora_config(model)
    layers = [layer for _, layer in lora.lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the LoRA layers are merged into W; call unmerge_lora(model) before exporting, "
                         "otherwise PEFT would add the update a second time")
    settings = {(layer.rank, layer.alpha, layer.use_rslora, layer.use_dora) for layer in layers}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers with different (rank, alpha, use_rslora, use_dora) {sorted(settings)} "
                         "cannot be described by one adapter_config.json")
    targets = config.target_modules
    fields = {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        # PEFT's flag for weights stored d_in × d_out (GPT-2's Conv1D); PEFT corrects it per layer type anyway.
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": config.use_dora,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return fields, lora.lora_state_dict(model)


# settings a LoRA adapter may carry that peft_lab.lora does not implement (fine while off: None/False/"none"/empty)
_LORA_UNSUPPORTED = ("bias", "modules_to_save", "layers_to_transform", "rank_pattern",
                     "alpha_pattern", "exclude_modules", "lora_bias", "target_parameters", "layer_replication",
                     "trainable_token_indices")


def _load_lora(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    for field in _LORA_UNSUPPORTED:
        value = config.get(field)
        if not (value is None or value is False or value == "none" or value == [] or value == {}):
            raise ValueError(f"this LoRA adapter uses {field}={value!r}, which peft_lab.lora does not implement")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{CONFIG_NAME} lacks the LoRA field {field!r}")
    targets = config["target_modules"]
    if targets == "all-linear":
        raise ValueError('target_modules="all-linear" is not supported here; list the module names instead')
    with _explain_misfit(config):
        lora.apply_lora(model, rank=config["r"], alpha=config["lora_alpha"],
                        dropout=config.get("lora_dropout", 0.0) or 0.0, target_modules=targets,
                        use_rslora=bool(config.get("use_rslora", False)),
                        use_dora=bool(config.get("use_dora", False)))
    return lora.load_lora_state_dict(model, tensors)


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
# IA3 (notebook 06): one vector per layer, "<layer>.ia3_l"
# ----------------------------------------------------------------------------------------------------------

def _has_ia3(model: nn.Module) -> bool:
    return any(True for _ in ia3.ia3_layers(model))


def _as_json(targets):
    return targets if isinstance(targets, str) else list(targets)


def _export_ia3(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    layers = [layer for _, layer in ia3.ia3_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("the IA3 layers are merged into W; call unmerge_ia3(model) before exporting, "
                         "otherwise PEFT would scale the weights a second time")
    config = ia3.ia3_config(model)
    fields = {"target_modules": _as_json(config.target_modules),
              "feedforward_modules": _as_json(config.feedforward_modules),
              "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
              "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}
    return fields, ia3.ia3_state_dict(model)


def _load_ia3(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    for field in ("modules_to_save", "exclude_modules"):
        if config.get(field):
            raise ValueError(f"this IA3 adapter uses {field}={config[field]!r}, which peft_lab.ia3 does not implement")
    if "target_modules" not in config:
        raise ValueError(f"{CONFIG_NAME} lacks the IA3 field 'target_modules'")
    with _explain_misfit(config):
        ia3.apply_ia3(model, target_modules=config["target_modules"],
                      feedforward_modules=config.get("feedforward_modules"))
    return ia3.load_ia3_state_dict(model, tensors)


# ----------------------------------------------------------------------------------------------------------
# Prefix tuning and prompt tuning (notebook 04): one tensor, "prompt_embeddings", no key prefix
# ----------------------------------------------------------------------------------------------------------

def _export_prompt_learning(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's fields for ``PrefixTuningConfig``/``PromptTuningConfig``; the tensor is the prefix itself (a
    reparameterized prefix is saved evaluated, as PEFT saves it: ``prefix_projection`` stays true in the
    config, and PEFT loads it in inference mode as a plain prefix)."""
    c = model.prefix_config
    fields = {"num_virtual_tokens": c.num_virtual_tokens, "token_dim": c.token_dim,
              "num_transformer_submodules": 1, "num_attention_heads": c.num_kv_heads if
              c.method == prefix.PREFIX_TUNING else model.config.num_attention_heads,
              "num_layers": c.num_layers, "modules_to_save": None}
    if c.method == prefix.PREFIX_TUNING:
        fields.update(encoder_hidden_size=c.projection_dim or c.token_dim,
                      prefix_projection=c.projection_dim is not None,
                      init_weights="zero" if c.init == "zero" else None)
    else:
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[c.init]
        name = getattr(model.config, "_name_or_path", "") or "tiny"
        fields.update(prompt_tuning_init=init, prompt_tuning_init_text=c.init_text, tokenizer_kwargs=None,
                      tokenizer_name_or_path=str(name) if init == "TEXT" else None)
    return fields, prefix.prefix_state_dict(model)


def _load_prompt_learning(method: str):
    def load(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
        for field in ("num_virtual_tokens", "num_layers", "token_dim"):
            if field not in config:
                raise ValueError(f"{CONFIG_NAME} lacks the {method} field {field!r}")
        if (config.get("num_transformer_submodules") or 1) != 1:
            raise ValueError(f"this adapter has num_transformer_submodules={config['num_transformer_submodules']} "
                             "(an encoder-decoder model); peft_lab supports decoder-only models")
        if config.get("modules_to_save"):
            raise ValueError(f"this adapter also trains modules_to_save={config['modules_to_save']!r}, which "
                             "peft_lab.prefix does not implement")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"expected a transformers causal LM, got {type(model).__name__}")
        shapes = prefix.prefix_shapes(model.config)
        width = shapes["kv_dim"] if method == prefix.PREFIX_TUNING else shapes["hidden_size"]
        made = {"num_layers": config["num_layers"], "token_dim": config["token_dim"]}
        here = {"num_layers": shapes["num_layers"], "token_dim": width}
        if made != here:
            raise ValueError(f"this {method} adapter was made for another architecture: its {CONFIG_NAME} says "
                             f"{made} (base {config.get('base_model_name_or_path')!r}), this model has {here}")
        apply = prefix.apply_prefix_tuning if method == prefix.PREFIX_TUNING else prefix.apply_prompt_tuning
        wrapped = apply(model, num_virtual_tokens=config["num_virtual_tokens"])
        return prefix.load_prefix_state_dict(wrapped, tensors)
    return load


#: PEFT ``peft_type`` → how that method is exported and imported.
PEFT_TYPES: dict[str, Method] = {
    "LORA": Method(detect=_has_lora, export=_export_lora, load=_load_lora),
    "IA3": Method(detect=_has_ia3, export=_export_ia3, load=_load_ia3),
    "PREFIX_TUNING": Method(detect=lambda m: prefix.is_prefix_model(m, prefix.PREFIX_TUNING),
                            export=_export_prompt_learning, load=_load_prompt_learning(prefix.PREFIX_TUNING),
                            key_prefix=""),
    "PROMPT_TUNING": Method(detect=lambda m: prefix.is_prefix_model(m, prefix.PROMPT_TUNING),
                            export=_export_prompt_learning, load=_load_prompt_learning(prefix.PROMPT_TUNING),
                            key_prefix=""),
}


# ----------------------------------------------------------------------------------------------------------
# The two public functions and the readers they share
# ----------------------------------------------------------------------------------------------------------

def export_peft_adapter(model: nn.Module, path, task_type: str = "CAUSAL_LM") -> Path:
    """Write ``model``'s adapter to the directory ``path`` in PEFT's format; return the directory.

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
    found = [peft_type for peft_type, method in PEFT_TYPES.items() if method.detect(model)]
    if not found:
        raise ValueError(f"this model carries no adapter to export (supported: {sorted(PEFT_TYPES)}); "
                         "apply one first, e.g. apply_lora(model)")
    if len(found) > 1:
        raise ValueError(f"this model carries several adapters {found}; export supports one at a time")
    peft_type = found[0]
    fields, tensors = PEFT_TYPES[peft_type].export(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "tiny"
    config = {"peft_type": peft_type, "task_type": task_type, "base_model_name_or_path": str(name),
              "inference_mode": True, "revision": None, **fields}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # fails here, before any file is touched
    key_prefix = PEFT_TYPES[peft_type].key_prefix  # "base_model.model." for LoRA, none for prompt learning
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


def import_peft_adapter(model: nn.Module, path) -> nn.Module:
    """Load the PEFT adapter directory ``path`` into ``model`` (a plain base model); return ``model``.

    The adapter's own settings are applied (for LoRA: ``apply_lora`` with ``r``, ``lora_alpha``,
    ``lora_dropout``, ``target_modules``, ``use_rslora``, ``use_dora``; for IA3: ``apply_ia3`` with
    ``target_modules``, ``feedforward_modules``), then its weights are copied in. On failure the
    model is left exactly as it came (:func:`peft_lab.core.rollback_on_error`).
    """
    validate.require_module("model", model)
    path = validate.require_path("path", path)
    config = read_adapter_config(path)
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"unsupported peft_type {peft_type!r} in {Path(path) / CONFIG_NAME}; "
                         f"peft_lab imports {sorted(PEFT_TYPES)}")
    tensors = read_adapter_weights(path)
    bad = [k for k, v in tensors.items() if not torch.is_floating_point(v)]
    if bad:
        raise ValueError(f"{WEIGHTS_NAME} holds non-float tensors {bad[:3]}")
    with core.rollback_on_error(model):
        return PEFT_TYPES[peft_type].load(model, config, tensors)
