"""AdapterHub's on-disk format for bottleneck adapters, in and out (notebook 03, "Equal to AdapterHub").

AdapterHub ``adapters`` (1.3.0) saves an adapter with ``model.save_adapter(dir, name, with_head=False,
use_safetensors=True)`` as a directory with

* ``adapter_config.json``: ``{"config": {...every BnConfig field...}, "hidden_size", "model_class",
  "model_name", "model_type", "name", "version"}``;
* ``adapter.safetensors``: keys ``transformer.h.{i}.output_adapters.adapters.{name}.adapter_down.0.weight``,
  ``...adapter_down.0.bias``, ``...adapter_up.weight``, ``...adapter_up.bias`` (Houlsby also
  ``attention_adapters``) — the same tensor shapes as ``peft_lab.adapters`` (``nn.Linear`` layout).

:func:`export_adapterhub_adapter` writes such a directory from a peft_lab model, so that AdapterHub's
``load_adapter`` loads it; :func:`import_adapterhub_adapter` reads one written by AdapterHub (or by us). The
mapping is checked both ways in AdapterHub's environment (``tests/adapterhub``: logits, gradients and a short loss
curve within the tolerance policy's bound for a reordered computation, ``peft_lab.tolerance``). GPT-2 only:
AdapterHub wires llama-style models through hooks with other residual conventions, which we do not claim to match.
Safetensors only: pickles (``pytorch_adapter.bin``) are refused.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from . import adapters as ad
from . import arch, core, validate
from .paths import atomic_path

__all__ = ["export_adapterhub_adapter", "import_adapterhub_adapter", "adapterhub_config",
           "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"
FORMAT_VERSION = "adapters.1.3.0"  # the AdapterHub release whose format this module writes and is tested with
_SUPPORTED_TYPES = ("gpt2",)

# AdapterHub's BnConfig fields that this module implements only at one value (the value AdapterHub's Pfeiffer,
# Houlsby and parallel configs use). Anything else is refused by name on import.
_FIXED = {"ln_before": False, "ln_after": False, "adapter_residual_before_ln": False, "use_gating": False,
          "phm_layer": False, "inv_adapter": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
          "stochastic_depth": 0.0, "original_ln_after": True}
# Fields with no effect once the above hold (PHM details, seeds, the inverse adapter's size).
_IGNORED = {"factorized_phm_W", "factorized_phm_rule", "hypercomplex_nonlinearity", "learn_phm", "phm_bias",
            "phm_c_init", "phm_dim", "phm_init_range", "phm_rank", "shared_W_phm", "shared_phm_rule",
            "init_weights_seed", "inv_adapter_reduction_factor", "residual_before_ln"}
_PLACEMENT_FLAGS = {"mh_adapter", "output_adapter", "original_ln_before", "is_parallel"}
_OTHERS = {"reduction_factor", "non_linearity", "init_weights", "scaling", "architecture"}
_INIT_NAMES = {"zero": "mam_adapter", "bert": "bert", "houlsby": "houlsby"}
_ACT_NAMES = {"relu": "relu", "swish": "swish", "silu": "silu", "gelu": "gelu", "tanh": "tanh", "identity": "linear"}
_SUBLAYER_KEYS = {"attn": "attention_adapters", "mlp": "output_adapters"}


def _placement_flags(placement: str) -> dict:
    return {"pfeiffer": dict(mh_adapter=False, output_adapter=True, original_ln_before=True, is_parallel=False),
            "houlsby": dict(mh_adapter=True, output_adapter=True, original_ln_before=False, is_parallel=False),
            "parallel": dict(mh_adapter=False, output_adapter=True, original_ln_before=False, is_parallel=True),
            }[placement]


def adapterhub_config(config: ad.BottleneckConfig) -> dict:
    """The ``"config"`` entry AdapterHub 1.3.0 writes for these settings (all BnConfig fields, sorted)."""
    rf = config.hidden_size / config.bottleneck_dim
    rf = int(rf) if rf == int(rf) else rf
    if int(config.hidden_size // rf) != config.bottleneck_dim:
        raise ValueError(f"bottleneck_dim={config.bottleneck_dim} cannot be written as an AdapterHub "
                         f"reduction_factor of width {config.hidden_size} (AdapterHub uses int(d // rf)); "
                         "pick a bottleneck_dim that divides the width")
    fields = dict(_FIXED, **_placement_flags(config.placement))
    fields.update(factorized_phm_W=True, factorized_phm_rule=False, hypercomplex_nonlinearity="glorot-uniform",
                  learn_phm=True, phm_bias=True, phm_c_init="normal", phm_dim=4, phm_init_range=0.0001,
                  phm_rank=1, shared_W_phm=False, shared_phm_rule=True, init_weights_seed=None,
                  inv_adapter_reduction_factor=None, residual_before_ln=True,
                  reduction_factor=rf, non_linearity=_ACT_NAMES[config.nonlinearity],
                  init_weights=_INIT_NAMES[config.init], scaling=float(config.scaling))
    return dict(sorted(fields.items()))


def export_adapterhub_adapter(model: nn.Module, path, name: str) -> Path:
    """Write ``model``'s adapters as AdapterHub's ``save_adapter(path, name, with_head=False,
    use_safetensors=True)`` would: ``adapter_config.json`` + ``adapter.safetensors``, written together
    (:func:`peft_lab.paths.atomic_path`: a failed call leaves ``path`` as it was)."""
    from safetensors.torch import save_file
    path = validate.require_path("path", path)
    validate.require_str("name", name)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"name must be a non-empty adapter name of letters, digits, '_' or '-' (it becomes part "
                         f"of every key), got name={name!r}; pass e.g. name='task'")
    config = ad.bottleneck_config(model)
    model_type = model.config.model_type
    if model_type not in _SUPPORTED_TYPES:
        raise ValueError(f"model type {model_type!r}: expected one of {_SUPPORTED_TYPES} for AdapterHub's format "
                         "(its llama-style wiring differs from ours); save with peft_lab.adapters.save_adapters.")
    tensors = {}
    for key, value in ad.bottleneck_state_dict(model).items():
        m = re.fullmatch(r"(transformer\.h\.\d+)\.(attn|mlp)\.(adapter_down\.0|adapter_up)\.(weight|bias)", key)
        if m is None:
            raise ValueError(f"unexpected adapter tensor {key!r}: not an AdapterHub GPT-2 layout")
        block, sub, part, kind = m.groups()
        tensors[f"{block}.{_SUBLAYER_KEYS[sub]}.adapters.{name}.{part}.{kind}"] = value.detach().contiguous().cpu()
    meta = {"config": adapterhub_config(config), "hidden_size": config.hidden_size,
            "model_class": type(model).__name__, "model_name": _model_name(model), "model_type": model_type,
            "name": name, "version": FORMAT_VERSION}
    text = json.dumps(meta, indent=2) + "\n"
    with atomic_path(path, folder=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    return path


def _model_name(model) -> str:
    """The hub id or ``"tiny"`` (never a local folder path)."""
    name = getattr(model.config, "name_or_path", "") or ""
    return Path(name).name if os.path.isabs(name) else name


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"path={str(path)!r}: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME} "
                                "(as written by AdapterHub's save_adapter). Check the path.")
    files = {p.name for p in path.iterdir()}
    if WEIGHTS_NAME not in files:
        if PICKLE_NAME in files:
            raise ValueError(f"{path} holds {PICKLE_NAME}, a pickle, which can run arbitrary code when loaded; "
                             "only safetensors is read here. Save it again with AdapterHub as "
                             "model.save_adapter(dir, name, with_head=False, use_safetensors=True).")
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}; expected AdapterHub's "
                                "save_adapter(dir, name, with_head=False, use_safetensors=True) output")
    if CONFIG_NAME not in files:
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; expected AdapterHub's save_adapter output")
    try:
        meta = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path / CONFIG_NAME} is not an AdapterHub adapter config (no 'config' object)")
    return meta


def _settings(config: dict, hidden_size: int) -> dict:
    """``apply_adapters`` keyword arguments for an AdapterHub BnConfig, or ValueError naming what we lack."""
    unknown = sorted(set(config) - set(_FIXED) - _IGNORED - _PLACEMENT_FLAGS - _OTHERS)
    if unknown:
        raise ValueError(f"this adapter config has fields {unknown}, which peft_lab.adapters does not implement "
                         "(is it a bottleneck adapter?)")
    if config.get("architecture") not in (None, "bottleneck"):
        raise ValueError(f"architecture={config['architecture']!r}: only bottleneck adapters are read here")
    bad = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in _FIXED.items() if k in config and config[k] != v]
    if bad:
        raise ValueError(f"this AdapterHub adapter uses {', '.join(bad)}, which peft_lab.adapters does not "
                         "implement")
    flags = {k: config.get(k) for k in ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel")}
    flags["is_parallel"] = bool(flags["is_parallel"])
    placement = next((p for p in ad.PLACEMENTS if _placement_flags(p) == flags), None)
    if placement is None:
        raise ValueError(f"placement flags {flags} match none of Pfeiffer (SeqBnConfig), Houlsby "
                         "(DoubleSeqBnConfig) or parallel (ParBnConfig); peft_lab.adapters implements only those")
    act = config.get("non_linearity")
    acts = {v: k for k, v in _ACT_NAMES.items()}
    if not isinstance(act, str) or act.lower() not in acts:
        raise ValueError(f"non_linearity={act!r}: peft_lab.adapters implements {sorted(acts)}")
    inits = {v: k for k, v in _INIT_NAMES.items()}
    init = inits.get(config.get("init_weights", "bert"))
    if init is None:
        raise ValueError(f"init_weights={config.get('init_weights')!r}: expected one of {sorted(inits)}")
    scaling, rf = config.get("scaling", 1.0), config.get("reduction_factor")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling={scaling!r}: only a fixed number is implemented (not learned/channel scaling)")
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
        raise ValueError(f"reduction_factor={rf!r}: only one positive number for every layer is implemented")
    return dict(placement=placement, bottleneck_dim=max(1, int(hidden_size // rf)), nonlinearity=acts[act.lower()],
                init=init, scaling=float(scaling))


def import_adapterhub_adapter(model: nn.Module, path) -> nn.Module:
    """Add to ``model`` the adapter saved by AdapterHub in ``path`` and load its weights (in place).

    Checks the model type (GPT-2) and width against the file, refuses pickles and config flags that
    ``peft_lab.adapters`` does not implement (naming them), and leaves the model as it came on any error.
    """
    from safetensors.torch import load_file
    validate.require_module("model", model)
    path = validate.require_path("path", path)
    meta = _read_config(path)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _SUPPORTED_TYPES:
        raise ValueError(f"model type {model_type!r}: expected one of {_SUPPORTED_TYPES}; AdapterHub adapters "
                         "are read here for GPT-2 only")
    if meta.get("model_type") not in (None, model_type):
        raise ValueError(f"this adapter was made for model type {meta['model_type']!r}, the model is "
                         f"{model_type!r}: load it into the architecture it was trained on")
    d = arch.width(model)
    if meta.get("hidden_size") != d:
        raise ValueError(f"this adapter was made for width hidden_size={meta.get('hidden_size')!r}, the model has "
                         f"{d}: load it into the model size it was trained on")
    settings = _settings(meta["config"], d)
    name = meta.get("name")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except Exception as err:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise ValueError(f"{path / WEIGHTS_NAME} is not a readable safetensors file (truncated or corrupt?): "
                         f"{err}") from err
    ours = {}
    pattern = re.compile(r"(transformer\.h\.\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
                         r"(adapter_down\.0|adapter_up)\.(weight|bias)")
    inverse = {v: k for k, v in _SUBLAYER_KEYS.items()}
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if m is None or (name is not None and m.group(3) != name):
            raise ValueError(f"unexpected key {key!r} in {WEIGHTS_NAME}: expected AdapterHub GPT-2 bottleneck "
                             f"keys like 'transformer.h.0.output_adapters.adapters.{name}.adapter_up.weight'")
        block, sub, _, part, kind = m.groups()
        ours[f"{block}.{inverse[sub]}.{part}.{kind}"] = value
    with core.rollback_on_error(model):
        ad.apply_adapters(model, **settings)
        ad.load_bottleneck_state_dict(model, ours)
    return model
