"""Architecture accessors: what the notebooks ask of a causal LM without naming GPT-2's or LLaMA's attributes.

Notebook 01 ("The tiny model"; "Any causal LM") and every method notebook after it. GPT-2 keeps its blocks in
``model.transformer.h`` with a fused ``attn.c_attn`` and ``config.n_embd``; a LLaMA-family model (LLaMA,
Mistral, Qwen2, SmolLM2 …) keeps them in ``model.model.layers`` with ``self_attn.q_proj`` … and
``config.hidden_size``. The functions here take a model (or, for sizes, a config) of either family, so a
notebook cell runs unchanged on ``"tiny"``, ``"tiny-llama"``, ``"gpt2"`` or ``"HuggingFaceTB/SmolLM2-135M"``.

Each method's default ``target_modules`` per model type live here, in :data:`DEFAULT_TARGETS`, one table for
the package (``lora.py``, ``compare.py``) and the notebooks: PEFT's own defaults
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_*_MAPPING``), which the tests compare entry by entry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

__all__ = [
    "Layout", "LAYOUTS", "DEFAULT_TARGETS", "MODEL_ENV_VAR", "model_name", "model_type", "layout", "blocks",
    "block_name", "attention", "mlp", "attention_qkv", "attention_output", "width", "num_layers", "num_heads",
    "num_kv_heads", "head_dim",
    "vocab_size", "context_length", "max_positions", "head_is_tied", "default_targets",
]

#: Environment variable the notebooks' parameters cell reads for ``MODEL_NAME`` (see :func:`model_name`).
MODEL_ENV_VAR = "PEFT_LAB_MODEL"


@dataclass(frozen=True)
class Layout:
    """Where the pieces of a pre-LN block live: the block list, and in each block the attention sublayer,
    the norm before the feed-forward sublayer (its input is ``x₁`` = block input + attention output) and the
    feed-forward sublayer (the MLP). Paths are dotted attribute names (``"transformer.h"``)."""

    blocks: str
    attn: str
    ffn_norm: str
    ffn: str
    attn_norm: str = ""     # the norm before the attention sublayer (its input is the block input x)
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # in the attention; one name: q, k, v fused
    out_proj: str = "o_proj"                               # the attention's output projection

    @property
    def fused_qkv(self) -> bool:
        """Whether one projection computes queries, keys and values (GPT-2's ``c_attn``, queries first)."""
        return len(self.qkv) == 1


_LLAMA = Layout("model.layers", "self_attn", "post_attention_layernorm", "mlp", "input_layernorm")
#: ``model.config.model_type`` → :class:`Layout`.
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("transformer.h", "attn", "ln_2", "mlp", "ln_1", qkv=("c_attn",), out_proj="c_proj"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}

#: Default ``target_modules`` per method and ``model.config.model_type``: PEFT's tables
#: (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, ``..._IA3_TARGET_MODULES_MAPPING``,
#: ``..._IA3_FEEDFORWARD_MODULES_MAPPING``) for these architectures. LoRA: the attention query and value
#: projections (Hu et al. 2021 §7.1; GPT-2 fuses q, k, v into one ``c_attn``). IA3: keys, values and the
#: feed-forward output projection (Liu et al. 2022; on GPT-2 the fused ``c_attn`` scales queries too), and
#: ``"ia3_feedforward"`` says which of those IA3 scales on the *input* side.
DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "lora": {
        "gpt2": ["c_attn"],
        "llama": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"],
        "qwen2": ["q_proj", "v_proj"],
        "opt": ["q_proj", "v_proj"],
        "gptj": ["q_proj", "v_proj"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
        "gpt_neox": ["query_key_value"],
        "falcon": ["query_key_value"],
        "t5": ["q", "v"],
    },
    "ia3": {
        "gpt2": ["c_attn", "mlp.c_proj"],
        "llama": ["k_proj", "v_proj", "down_proj"],
        "mistral": ["k_proj", "v_proj", "down_proj"],
        "qwen2": ["q_proj", "v_proj", "down_proj"],
    },
    "ia3_feedforward": {
        "gpt2": ["mlp.c_proj"],
        "llama": ["down_proj"],
        "mistral": ["down_proj"],
        "qwen2": ["down_proj"],
    },
}


def model_name(default: str = "tiny") -> str:
    """``$PEFT_LAB_MODEL`` if set (a name for :func:`peft_lab.load_base_model`: ``"tiny"``,
    ``"tiny-llama"``, a hub id or a folder), else ``default``. Every notebook's parameters cell calls it, so
    an instructor runs the whole course on another model without editing a notebook."""
    value = os.environ.get(MODEL_ENV_VAR, "").strip()
    return value or default


def _config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config


def model_type(model_or_config) -> str:
    """``config.model_type``: ``"gpt2"`` for tiny and GPT-2, ``"llama"`` for tiny-llama and LLaMA."""
    return _config(model_or_config).model_type


def layout(model_or_config) -> Layout:
    """The :class:`Layout` of the model's type; an unknown type is refused with the known ones listed."""
    kind = model_type(model_or_config)
    if kind not in LAYOUTS:
        raise ValueError(f"model type {kind!r}: the block layout is known for {sorted(LAYOUTS)}; add a Layout "
                         "entry to peft_lab.arch.LAYOUTS for another one")
    return LAYOUTS[kind]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks in order (GPT-2 ``model.transformer.h``, LLaMA ``model.model.layers``)."""
    return _get(_unwrap(model), layout(model).blocks)


def block_name(model: nn.Module, i: int) -> str:
    """The module name of block ``i`` as ``named_modules`` spells it (``"transformer.h.0"``,
    ``"model.layers.0"``)."""
    return f"{layout(model).blocks}.{i}"


def attention(model: nn.Module, i: int = 0) -> nn.Module:
    """Block ``i``'s attention sublayer (GPT-2 ``attn``, LLaMA ``self_attn``)."""
    return getattr(blocks(model)[i], layout(model).attn)


def mlp(model: nn.Module, i: int = 0) -> nn.Module:
    """Block ``i``'s feed-forward sublayer (``mlp`` in both families: GELU ``c_fc``/``c_proj`` in GPT-2,
    SwiGLU ``gate_proj``/``up_proj``/``down_proj`` in LLaMA)."""
    return getattr(blocks(model)[i], layout(model).ffn)


def attention_qkv(attn: nn.Module, hidden, position_embeddings=None):
    """Queries, keys and values of the attention sublayer ``attn`` for its input ``hidden`` (B, T, d), as the
    attention kernel sees them: ``q`` of shape (B, heads, T, d_h), ``k`` and ``v`` of shape
    (B, KV heads, T, d_h) — fewer heads than ``q`` under grouped-query attention; repeat each
    ``heads / KV heads`` times to pair them with the queries (``repeat_interleave(g, dim=1)``).

    GPT-2: one fused ``c_attn`` split into q, k, v (positions were added to the input embeddings). LLaMA:
    ``q_proj``, ``k_proj``, ``v_proj``, then the rotary position embedding on q and k, for which
    ``position_embeddings`` = the ``(cos, sin)`` the model passed to this layer (capture it with a forward hook
    registered ``with_kwargs=True``)."""
    B, T, _ = hidden.shape
    names = layout(attn.config).qkv
    if len(names) == 1:                                           # GPT-2: fused, queries first
        d = hidden.shape[-1]
        heads = attn.num_heads
        split = lambda t: t.view(B, T, heads, -1).transpose(1, 2)
        return tuple(split(t) for t in getattr(attn, names[0])(hidden).split(d, dim=-1))
    hd = attn.head_dim
    split = lambda t: t.view(B, T, -1, hd).transpose(1, 2)
    q, k, v = split(attn.q_proj(hidden)), split(attn.k_proj(hidden)), split(attn.v_proj(hidden))
    if position_embeddings is None:
        raise ValueError("a rotary-position model needs position_embeddings=(cos, sin): take them from the "
                         "attention layer's forward kwargs")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def attention_output(attn: nn.Module, per_head):
    """The attention sublayer's output from the heads' results ``per_head`` (B, heads, T, d_h): heads
    concatenated, then the output projection (GPT-2 ``c_proj``, LLaMA ``o_proj``)."""
    B, _, T, _ = per_head.shape
    proj = getattr(attn, layout(attn.config).out_proj)
    return proj(per_head.transpose(1, 2).reshape(B, T, -1))


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper (PEFT's ``PeftModel``, our ``PrefixModel``): the nearest of
    ``model`` and its nested ``.model`` / ``.base_model`` that has the block list."""
    path = layout(model).blocks
    level = [model]
    for _ in range(4):      # PeftModel -> LoraModel -> the transformers model: a few levels at most
        for candidate in level:
            if _has_path(candidate, path):
                return candidate
        level = [inner for candidate in level for inner in (getattr(candidate, "model", None),
                                                             getattr(candidate, "base_model", None))
                 if isinstance(inner, nn.Module) and inner is not candidate]
    raise ValueError(f"no block list {path!r} found in the {type(model).__name__} given")


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
        return True
    except AttributeError:
        return False


def width(model_or_config) -> int:
    """The model width ``d`` (``hidden_size``; GPT-2's ``n_embd``)."""
    return int(_config(model_or_config).hidden_size)


def num_layers(model_or_config) -> int:
    """The number of blocks ``L`` (``num_hidden_layers``; GPT-2's ``n_layer``)."""
    return int(_config(model_or_config).num_hidden_layers)


def num_heads(model_or_config) -> int:
    """Query heads ``h`` (``num_attention_heads``; GPT-2's ``n_head``)."""
    return int(_config(model_or_config).num_attention_heads)


def num_kv_heads(model_or_config) -> int:
    """Key/value heads: fewer than :func:`num_heads` under grouped-query attention (LLaMA's
    ``num_key_value_heads``), equal to it in GPT-2 (multi-head attention)."""
    config = _config(model_or_config)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(model_or_config) -> int:
    """Width of one head (``config.head_dim`` where set, else ``d / h``)."""
    config = _config(model_or_config)
    return int(getattr(config, "head_dim", None) or width(config) // num_heads(config))


def vocab_size(model_or_config) -> int:
    """Vocabulary size ``V``."""
    return int(_config(model_or_config).vocab_size)


def context_length(model_or_config) -> int:
    """Longest sequence the model takes (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    length = max_positions(_config(model_or_config))
    if length is None:
        raise ValueError(f"{type(model_or_config).__name__} does not say its context length "
                         "(config.max_position_embeddings)")
    return length


def max_positions(config) -> int | None:
    """``config.max_position_embeddings`` (GPT-2's ``n_positions``, which its config maps to that name) as an
    ``int``, or ``None`` where a config (or a non-config) does not say: the one reading of the context length."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the token embedding (GPT-2: yes; LLaMA-style models
    such as tiny-llama: no, so the head's ``V·d`` parameters count, and train, on their own)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def default_targets(model_or_config, method: str = "lora") -> list[str]:
    """PEFT's default ``target_modules`` of ``method`` (``"lora"``, ``"ia3"``, ``"ia3_feedforward"``) for the
    model's type, from :data:`DEFAULT_TARGETS`: GPT-2 LoRA ``["c_attn"]``, LLaMA LoRA ``["q_proj", "v_proj"]``."""
    if method not in DEFAULT_TARGETS:
        raise ValueError(f"method must be one of {sorted(DEFAULT_TARGETS)}, got {method!r}")
    kind = model_type(model_or_config)
    table = DEFAULT_TARGETS[method]
    if kind not in table:
        raise ValueError(f"no default {method} target_modules for model type {kind!r} (known: {sorted(table)}); "
                         "pass target_modules=[...] naming its linear layers")
    return list(table[kind])
