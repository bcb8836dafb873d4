"""Base models: the shipped offline "tiny" (GPT-2) and "tiny-llama" (LLaMA), any Hugging Face model online, and
real architectures from config.

Notebook 00 ("Real architectures on the meta device") and 01 ("The tiny model").
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig
from transformers.utils import logging as hf_logging

from . import validate
from .paths import data_dir, pick_device

TINY = "tiny"
TINY_LLAMA = "tiny-llama"
#: The offline models shipped in ``data/``: name → the command that rebuilds it.
SHIPPED: dict[str, str] = {
    TINY: "python -m peft_lab.pretrain --out {path}",
    TINY_LLAMA: "python -m peft_lab.pretrain --arch llama --out {path}",
}

# Published architecture hyper-parameters, written here so that no download is needed to build them.
# GPT-2: Radford et al. 2019, Table 2 (the Hugging Face configs of gpt2, gpt2-medium, -large, -xl).
# LLaMA-2 7B: Touvron et al. 2023 (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000).
ARCHITECTURES: dict[str, tuple[type, dict]] = {
    "gpt2": (GPT2Config, dict(n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": (GPT2Config, dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": (GPT2Config, dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": (GPT2Config, dict(n_embd=1600, n_layer=48, n_head=25)),
    "llama-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                   max_position_embeddings=4096, tie_word_embeddings=False)),
}


def architecture_config(name: str):
    """The transformers config of a named architecture (see :data:`ARCHITECTURES`, or a shipped model:
    ``"tiny"``, ``"tiny-llama"``)."""
    if name in SHIPPED:
        return AutoConfig.from_pretrained(_tiny_dir(name))
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture name={name!r}; choose one of {[*SHIPPED, *ARCHITECTURES]}")
    cls, kwargs = ARCHITECTURES[name]
    config = cls(**kwargs)
    if cls is GPT2Config:  # dropout off, as in the tiny model, so runs are deterministic and comparable
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return config


def build_from_config(name, device: str | torch.device = "meta", dtype: torch.dtype | None = None,
                      seed: int = 0):
    """A causal LM with the architecture ``name`` (or a transformers config object), no weights downloaded.

    ``device="meta"`` allocates nothing: shapes and parameter counts are exact, values do not exist — use it
    for counting and memory estimates of models too large for the machine. ``device="cpu"`` (or ``"cuda"``)
    gives a random initialisation, seeded by ``seed``, for equivalence tests and timing.
    """
    from transformers import PretrainedConfig
    if not isinstance(name, (str, PretrainedConfig)):
        raise TypeError(f"name must be an architecture name such as 'gpt2' (one of {[*SHIPPED, *ARCHITECTURES]}) "
                        f"or a transformers config, got {validate.describe(name)}")
    _check_dtype(dtype)
    seed = validate.require_int("seed", seed)
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'meta' or 'cpu', or a torch.device, got "
                        f"{validate.describe(device)}")
    config = name if not isinstance(name, str) else architecture_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    _set_loss_type(model)
    return model.eval()


def meta_size(name) -> tuple[object, int]:
    """``(config, parameter count)`` of an architecture (a name of :func:`build_from_config` or a config),
    built on the meta device: nothing is allocated. Named architectures are built once per session."""
    return _named_meta_size(name) if isinstance(name, str) else _meta_size(name)


def _meta_size(name) -> tuple[object, int]:
    model = build_from_config(name, device="meta")
    return model.config, sum(p.numel() for p in model.parameters())


_named_meta_size = lru_cache(maxsize=None)(_meta_size)


def _tiny_dir(name: str = TINY):
    path = data_dir() / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the {name} model is missing from {path}. Rebuild it with "
            f"`{SHIPPED[name].format(path=path)}` (it takes minutes on a CPU)."
        )
    return path


def load_base_model(name: str = TINY, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: cuda → mps → cpu).

    ``"tiny"`` (GPT-2) and ``"tiny-llama"`` (LLaMA: RoPE, grouped-query attention, SwiGLU, untied head) are
    the offline models shipped in ``data/``; any other name goes to ``from_pretrained`` (a hub id such as
    ``"gpt2"`` when online, or a local folder). The tokenizer always has a pad token. The notebooks pass
    :func:`peft_lab.arch.model_name`, so ``PEFT_LAB_MODEL`` picks the model of a whole run.
    """
    if not isinstance(name, str) or not name:
        kind = TypeError if not isinstance(name, str) else ValueError  # a wrong kind, or an empty string
        raise kind(f"name must be a non-empty string (\"tiny\", a hub id such as \"gpt2\", or a folder), "
                   f"got {validate.describe(name)}")
    target = pick_device(device)
    _check_dtype(dtype)
    shipped = name in SHIPPED
    local = shipped or _is_local(name)
    source = _tiny_dir(name) if shipped else (_model_folder(name) if local else name)
    kwargs = {"dtype": dtype} if dtype else {}
    # transformers raises OSError, ValueError (the hub client's HFValidationError at 4.57) or ImportError
    # depending on release and what is missing; every one becomes the same message with the hint.
    errors = (OSError, ValueError, ImportError)
    try:
        try:  # a local folder, or a hub model already in the local cache: no network needed
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            with _no_loading_bar() if shipped else nullcontext():
                model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
        except errors:
            if local or not _hub_reachable():
                raise  # fail at once rather than after the hub client's retries
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except errors as err:
        if local:
            raise OSError(f"could not load the model folder {name!r} ({type(err).__name__}: {err}). A model "
                          "folder is what model.save_pretrained(folder) and tokenizer.save_pretrained(folder) "
                          'write. Offline, the shipped model is load_base_model("tiny").') from err
        raise OSError(
            f"could not load {name!r}: it is not a local folder or cached model, and the Hugging Face Hub "
            "could not provide it (no network, or no such model id). Offline, use the shipped model: "
            'load_base_model("tiny").'
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _set_loss_type(model)
    return model.to(target).eval(), tokenizer


def _check_dtype(dtype) -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        fix = f" (write torch.{dtype} without quotes)" if isinstance(dtype, str) else ""
        raise TypeError(f"dtype must be None or a torch.dtype such as torch.float16, got "
                        f"{validate.describe(dtype)}{fix}")


def _is_local(name: str) -> bool:
    """A folder rather than a hub id: it exists, or is written like a path (hub ids are "name" or
    "org/name")."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def _model_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir():
        what = "it is a file, not a folder" if path.exists() else "no such folder exists"
        raise FileNotFoundError(f"name={name!r} looks like a folder, but {what}. Offline, the shipped model is "
                                'load_base_model("tiny").')
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the folder name={name!r} has no config.json, so it holds no saved model "
                                "(model.save_pretrained(folder) and tokenizer.save_pretrained(folder) write one). "
                                'Offline, the shipped model is load_base_model("tiny").')
    return path


@contextmanager
def _no_loading_bar():
    """Hide transformers' "Loading weights" progress bar (5.x) for the tiny model's sub-second load.

    Only the bar: warnings and errors still go through transformers' logging as usual.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers one request, sent by huggingface_hub's own HTTP session, so the
    user's proxy settings (``HTTPS_PROXY``) and endpoint (``HF_ENDPOINT``) apply; ``HF_HUB_OFFLINE`` says no
    without asking. Offline, the hub client would retry for most of a minute before giving up."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP answer means reachable
        return True
    except Exception:  # requests' or httpx's connection errors, by huggingface_hub release
        return False


def _set_loss_type(model) -> None:
    # GPT-2's class name does not tell transformers which loss to use; say it, and skip a warning per model.
    if getattr(model, "loss_type", None) is None and hasattr(model, "loss_type"):
        model.loss_type = "ForCausalLM"
