"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021), notebook 04.

The equations of notebook 04 ("Prefix tuning"), for a model with L layers, width d, h attention heads of size
d_h, h_kv key/value heads (h_kv < h with grouped-query attention) and d_kv = h_kv · d_h:

* (04.1) every layer l attends over ``P`` learned key/value vectors before the T real ones:
  ``K'_l = [P_k^l; K_l]``, ``V'_l = [P_v^l; V_l]`` (``P_k^l, P_v^l: P × d_kv``); the base model is frozen
* (04.2) the output of a head splits into ``(1 − λ) · Attn(q, K, V) + λ · Attn(q, P_k, P_v)``, λ the prefix's
  share of the softmax mass (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning",
  §3.1)
* (04.3) trainable numbers: prefix tuning ``L · 2 · P · d_kv``; prompt tuning ``P · d`` (input layer only)
* (04.4) reparameterization (Li & Liang §4.3): ``[P_k; P_v] = W_2 tanh(W_1 E + b_1) + b_2`` with ``E: P × d_kv``,
  ``W_1: d_kv → m``, ``W_2: m → L · 2 · d_kv``; after training it folds into plain tensors
  (:func:`fold_prefix_projection`)
* (04.5) positions: the prefix occupies cache slots 0…P−1, so the real tokens get positions P…P+T−1

Layout is PEFT's, so weights copy one to one: :class:`PrefixEncoder` holds ``embedding`` (and ``transform`` =
Linear → Tanh → Linear with a projection) and returns a ``P × (L·2·d_kv)`` tensor, viewed as
``(B, P, 2L, h_kv, d_h)``, permuted to ``(2L, B, h_kv, P, d_h)`` and split in pairs into each layer's (keys,
values); those go to the model as a ``DynamicCache``, with P ones prepended to the attention mask.
:class:`PromptEmbedding` is one ``Embedding(P, d)`` whose rows are concatenated before the input embeddings.

Typical use::

    model = apply_prefix_tuning(base, num_virtual_tokens=20)   # a PrefixTuningModel; the base is frozen
    history = train(model, examples)                             # only the prefix trains
    with disable_prefix(model):                                  # exactly the base model
        ...
    base = remove_prefix(model)                                  # the base model object back, untouched
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from . import arch, core, registry, validate

__all__ = ["PrefixConfig", "PrefixEncoder", "PromptEmbedding", "PrefixModel", "PrefixTuningModel",
           "PromptTuningModel", "apply_prefix_tuning",
           "apply_prompt_tuning", "fold_prefix_projection", "remove_prefix", "disable_prefix",
           "prefix_state_dict", "load_prefix_state_dict", "prefix_shapes", "is_prefix_model"]

PREFIX_TUNING, PROMPT_TUNING = "prefix_tuning", "prompt_tuning"
_INITS = {PREFIX_TUNING: ("random", "zero", "text"), PROMPT_TUNING: ("random", "vocab", "text")}
_METHOD = "prefix"  # the name of the config record (core.record_config) on a base model a PrefixModel holds


@dataclass(frozen=True)
class PrefixConfig:
    """The settings a :class:`PrefixModel` was built with (the PEFT export writes them).

    ``token_dim`` is the width of one virtual token as PEFT counts it: ``d_kv`` for prefix tuning (the keys
    and values of one layer), ``d`` for prompt tuning (an input embedding). ``projection_dim`` is the hidden
    width ``m`` of the reparameterization (None: none, or folded away). ``init`` is prompt tuning's
    initialisation: ``"random"``, ``"vocab"`` or ``"text"``; prefix tuning's ``"random"``, ``"zero"`` or
    ``"text"``; with ``"text"``, ``init_text`` holds the text.
    """

    method: str
    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    token_dim: int
    projection_dim: int | None = None
    init: str = "random"
    init_text: str | None = None

    def __post_init__(self):
        validate.require_str("method", self.method, choices=[PREFIX_TUNING, PROMPT_TUNING])
        for name in ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim", "token_dim"):
            validate.require_int(name, getattr(self, name), min=1)
        validate.optional(validate.require_int, "projection_dim", self.projection_dim, min=1)
        validate.require_str("init", self.init, choices=_INITS[self.method])
        if self.projection_dim is not None and self.method == PROMPT_TUNING:
            raise ValueError("projection_dim is prefix tuning's reparameterization; prompt tuning has none")
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init_text goes with init='text', and only with it")


def prefix_shapes(config) -> dict[str, int]:
    """``{"num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "kv_dim"}`` of a transformers
    config: what sizes the prefix (equation 04.3). GPT-2 names them ``n_layer``/``n_embd``/``n_head``; LLaMA's
    ``num_key_value_heads`` < ``num_attention_heads`` is grouped-query attention."""
    try:
        s = {"num_layers": arch.num_layers(config), "hidden_size": arch.width(config),
             "num_heads": arch.num_heads(config), "num_kv_heads": arch.num_kv_heads(config),
             "head_dim": arch.head_dim(config)}
    except AttributeError as err:
        raise TypeError(f"the model's config ({type(config).__name__}) does not say its number of layers, width "
                        f"and heads ({err}); prefix tuning needs them to size the prefix") from None
    return {**s, "kv_dim": s["num_kv_heads"] * s["head_dim"]}


# ----------------------------------------------------------------------------------------------------------
# The two encoders
# ----------------------------------------------------------------------------------------------------------

class PrefixEncoder(nn.Module):
    """The trainable prefix of every layer, as one ``P × (L·2·d_kv)`` tensor (equations 04.1, 04.3, 04.4).

    Without projection: ``embedding = Embedding(P, L·2·d_kv)`` — the prefix itself. With ``projection_dim=m``:
    ``embedding = Embedding(P, d_kv)`` then ``transform = Linear(d_kv, m) → Tanh → Linear(m, L·2·d_kv)``.
    Names, shapes and the default initialisation (PyTorch's: N(0, 1) embeddings, Kaiming-uniform linears) are
    PEFT's ``PrefixEncoder``'s.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int, projection_dim: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.kv_dim = num_virtual_tokens, num_layers, kv_dim
        self.projection_dim = projection_dim
        out = num_layers * 2 * kv_dim
        kw = dict(device=device, dtype=dtype)
        if projection_dim is None:
            self.embedding = nn.Embedding(num_virtual_tokens, out, **kw)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(kv_dim, projection_dim, **kw), nn.Tanh(),
                                           nn.Linear(projection_dim, out, **kw))

    def forward(self) -> torch.Tensor:
        """The prefix of all layers, ``P × (L·2·d_kv)``; with projection, equation (04.4)."""
        if self.projection_dim is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"kv_dim={self.kv_dim}, projection_dim={self.projection_dim}")


class PromptEmbedding(nn.Module):
    """Prompt tuning's ``P × d`` virtual token embeddings (PEFT's ``PromptEmbedding``: one ``embedding``)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device, dtype=dtype)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


# ----------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------

def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (4.x and early 5.x); None when it takes neither. Notebook 04 passes a hand-built
    prefix cache by this name (sections 2.5 and 3)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _max_positions(config) -> int | None:
    return arch.max_positions(config)


class PrefixModel(core.Switchable):
    """What prefix tuning and prompt tuning share: a frozen causal LM plus ``P`` virtual tokens in front of
    the input. :class:`PrefixTuningModel` puts them into every layer's keys and values, :class:`PromptTuningModel`
    before the input embeddings; built by :func:`apply_prefix_tuning` / :func:`apply_prompt_tuning`.

    Submodules: ``base_model`` (frozen) and ``prompt_encoder`` (the only trainable part), so ``parameters()``,
    ``state_dict()``, ``count_parameters`` and ``train`` see both with no special case. ``forward`` takes what
    the base model takes (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``labels``, ...) and returns
    the base model's output with logits for the input tokens only; each subclass injects its own input
    (:meth:`_run`, :meth:`_generation_inputs`). ``config`` is the base model's transformers config;
    ``prefix_config`` the :class:`PrefixConfig`.
    """

    def __init__(self, base_model: nn.Module, prompt_encoder: nn.Module, prefix_config: PrefixConfig):
        super().__init__()
        self.base_model = base_model
        self.prompt_encoder = prompt_encoder
        self.prefix_config = prefix_config
        self._cache_arg = cache_argument(base_model)

    # -- what the rest of the package and transformers expect of a model -----------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix_config.num_virtual_tokens

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, position_ids=None,
                **kwargs):
        if self.disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)
        batch_size, _ = self._check_inputs(input_ids, inputs_embeds, attention_mask, labels, kwargs)
        if attention_mask is not None:  # the real tokens may attend to all P virtual tokens
            ones = torch.ones(batch_size, self.num_virtual_tokens, dtype=attention_mask.dtype,
                              device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        return self._run(batch_size, input_ids=input_ids, inputs_embeds=inputs_embeds,
                         attention_mask=attention_mask, labels=labels, position_ids=position_ids, **kwargs)

    def _run(self, batch_size: int, **inputs):
        """The base model on ``inputs`` (attention mask already extended) with this method's virtual tokens."""
        raise NotImplementedError

    def _generation_inputs(self, input_ids: torch.Tensor, batch_size: int) -> dict:
        """What ``generate`` gets besides the ids: the virtual tokens as P already-processed positions."""
        raise NotImplementedError

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, labels, kwargs) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (token ids, batch × length) or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                kind = TypeError if not isinstance(input_ids, torch.Tensor) else ValueError
                raise kind(f"input_ids must be a 2-D tensor of token ids (batch × length), got "
                                 f"{validate.describe(input_ids)}; for one sequence use ids.unsqueeze(0)")
            shape = tuple(input_ids.shape)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
                raise ValueError(f"inputs_embeds must be a 3-D tensor (batch × length × width), got "
                                 f"{validate.describe(inputs_embeds)}")
            shape = tuple(inputs_embeds.shape[:2])
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != shape):
            raise ValueError(f"attention_mask must have the shape of the input, {shape} (batch × length, 1 = real "
                             f"token, 0 = padding), got {validate.describe(attention_mask)}. The wrapper adds the "
                             f"{self.num_virtual_tokens} virtual tokens' ones itself: pass the mask of the real "
                             "tokens only")
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape):
            raise ValueError(f"labels must have the shape of the input, {shape}, got {validate.describe(labels)}")
        for name in ("past_key_values", "cache"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} cannot be passed to a {self.prefix_config.method} model: the wrapper "
                                 "builds the cache from the prefix itself. Use model.generate(...) to generate")
        limit = _max_positions(self.config)
        total = self.num_virtual_tokens + shape[1]
        if limit is not None and total > limit:
            raise ValueError(f"{self.num_virtual_tokens} virtual tokens + {shape[1]} input tokens = {total} positions, "
                             f"but the model has {limit}; shorten the input to at most "
                             f"{limit - self.num_virtual_tokens} tokens or use fewer virtual tokens")
        return shape

    # -- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``base_model.generate`` with the virtual tokens in front; returns input ids + new ids, as HF does.

        The P virtual tokens are handed to ``generate`` as P already-processed positions: for prefix tuning
        a cache that holds the prefix, for prompt tuning ``inputs_embeds`` that start with the prompt, each behind
        P placeholder ids (stripped from the result). ``generate`` then numbers the real tokens from P on
        (equation 04.5), per row from the attention mask, so left padding gives each row the continuation it gets
        alone. Greedy search and sampling; one sequence per input row.
        """
        if self.disabled:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch_size, seq_len = self._check_inputs(input_ids, None, attention_mask, None, kwargs)
        for name in ("num_beams", "num_return_sequences"):
            if kwargs.get(name, 1) != 1:
                raise ValueError(f"{name}={kwargs[name]} is not supported by PrefixModel.generate (one greedy or "
                                 "sampled sequence per row); repeat the rows of input_ids instead")
        if "inputs_embeds" in kwargs:
            raise ValueError("PrefixModel.generate takes input_ids, not inputs_embeds")
        P = self.num_virtual_tokens
        placeholders = input_ids[:, :1].expand(batch_size, P)  # never embedded: they stand for the prefix slots
        ids = torch.cat([placeholders, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(batch_size, P), attention_mask], dim=1)
        kwargs.update(self._generation_inputs(input_ids, batch_size))
        out = self.base_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, P:]
        out["sequences"] = out.sequences[:, P:]
        return out

    def extra_repr(self) -> str:
        c = self.prefix_config
        return (f"method={c.method}, num_virtual_tokens={c.num_virtual_tokens}, num_layers={c.num_layers}, "
                f"num_kv_heads={c.num_kv_heads}, head_dim={c.head_dim}, disabled={self.disabled}")


class PrefixTuningModel(PrefixModel):
    """Prefix tuning: the :class:`PrefixEncoder`'s keys and values sit before the real ones in every layer
    (equations 04.1, 04.5), handed to the base model as its key/value cache."""

    def prefix_key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefix ``(keys, values)``, both ``batch_size × h_kv × P × d_h`` (equation 04.1),
        in the base model's dtype: PEFT's ``view(B, P, 2L, h_kv, d_h).permute(2, 0, 3, 1, 4).split(2)``."""
        c = self.prefix_config
        flat = self.prompt_encoder().to(self.base_model.dtype)
        kv = flat.unsqueeze(0).expand(batch_size, -1, -1)
        kv = kv.view(batch_size, c.num_virtual_tokens, 2 * c.num_layers, c.num_kv_heads, c.head_dim)
        return [(pair[0], pair[1]) for pair in kv.permute(2, 0, 3, 1, 4).split(2)]

    def prefix_cache(self, batch_size: int):
        """The prefix as a transformers ``DynamicCache`` holding P positions in every layer."""
        from transformers import DynamicCache
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.prefix_key_values(batch_size)):
            cache.update(keys, values, layer)
        return cache

    def _run(self, batch_size: int, position_ids=None, **inputs):
        if self.training and _checkpointing(self.base_model):
            raise ValueError(_GRADIENT_CHECKPOINTING)
        if position_ids is not None:  # PEFT shifts given positions past the prefix (equation 04.5)
            position_ids = position_ids + self.num_virtual_tokens
        inputs[self._cache_arg] = self.prefix_cache(batch_size)
        return self.base_model(position_ids=position_ids, **inputs)

    def _generation_inputs(self, input_ids: torch.Tensor, batch_size: int) -> dict:
        return {self._cache_arg: self.prefix_cache(batch_size)}


class PromptTuningModel(PrefixModel):
    """Prompt tuning: the :class:`PromptEmbedding`'s P vectors are concatenated before the input embeddings;
    labels get P ``-100`` in front, and the P virtual positions' logits are dropped (PEFT's loss, over the
    real tokens)."""

    def prompt_embeddings(self, batch_size: int) -> torch.Tensor:
        """The virtual tokens, ``batch_size × P × d``, in the base model's dtype."""
        return self.prompt_encoder().to(self.base_model.dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def _run(self, batch_size: int, input_ids=None, inputs_embeds=None, labels=None, position_ids=None, **inputs):
        if position_ids is not None:
            raise ValueError("position_ids are not supported with prompt tuning: the P virtual tokens take "
                             "positions 0…P−1 and the input follows them. Leave position_ids out.")
        P = self.num_virtual_tokens
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([self.prompt_embeddings(batch_size).to(inputs_embeds.dtype), inputs_embeds], 1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch_size, P), validate.IGNORE_INDEX), labels], dim=1)
        out = self.base_model(inputs_embeds=inputs_embeds, labels=labels, **inputs)
        out["logits"] = out.logits[:, P:]  # one row per input token, as the base model returns
        return out

    def _generation_inputs(self, input_ids: torch.Tensor, batch_size: int) -> dict:
        embeds = self.base_model.get_input_embeddings()(input_ids)
        return {"inputs_embeds": torch.cat([self.prompt_embeddings(batch_size).to(embeds.dtype), embeds], 1)}


_GRADIENT_CHECKPOINTING = ("prefix tuning cannot be combined with gradient checkpointing (the checkpointed layers "
                           "recompute without the prefix cache; PEFT refuses it too). Call "
                           "model.gradient_checkpointing_disable() on the base model first")


def _checkpointing(model: nn.Module) -> bool:
    # transformers sets `gradient_checkpointing` on the modules that checkpoint (it acts in training only)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# Building, folding, removing
# ----------------------------------------------------------------------------------------------------------

def _check_args(model, method: str, num_virtual_tokens) -> dict:
    """The model and the prefix length checked; the model's sizes (:func:`prefix_shapes`) returned."""
    validate.require_int("num_virtual_tokens", num_virtual_tokens, min=1)
    if isinstance(model, nn.Module):
        registry.require_no_method(model, method.replace("_", " "))
    if core.get_config(model, _METHOD) is not None:  # the base inside a wrapper
        raise ValueError(f"this model already has virtual tokens ({method} cannot be applied twice). Call "
                         "remove_prefix(model) first, or start from a fresh copy of the base model")
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{method} needs a transformers causal language model (with a .config), got "
                        f"{type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{method} here supports decoder-only causal LMs; {type(model).__name__} is an "
                        "encoder-decoder model")
    if cache_argument(model) is None:
        raise TypeError(f"{type(model).__name__}.forward takes no key/value cache (past_key_values/cache), so the "
                        "prefix has no way in; use a causal LM such as GPT2LMHeadModel or LlamaForCausalLM")
    return prefix_shapes(model.config)


def _wrap(model: nn.Module, cls: type, encoder: nn.Module, config: PrefixConfig) -> PrefixModel:
    core.freeze(model)  # every weight, embedding and norm of the base; the encoder is created trainable
    core.record_config(model, _METHOD, config)  # marks the base as held: applying again is refused
    return cls(model, encoder, config)


def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20, projection_dim: int | None = None,
                        init: str = "random", init_text: str | None = None, tokenizer=None) -> PrefixTuningModel:
    """Prefix tuning (Li & Liang 2021): P trainable keys and values in every layer; return a
    :class:`PrefixTuningModel`.

    The base ``model`` is frozen and held by the wrapper (not copied). ``projection_dim=m`` trains through the
    reparameterization of equation (04.4) (PEFT's ``prefix_projection=True, encoder_hidden_size=m``); fold it
    away after training with :func:`fold_prefix_projection`. With grouped-query attention the prefix has the
    width of the key/value heads, ``d_kv`` (as in PEFT). ``init``:

    * ``"random"``: PyTorch's (and PEFT's) default, N(0, 1) prefix entries;
    * ``"zero"``: PEFT's ``init_weights="zero"``: the prefix (with a projection: the last layer's weight and
      bias) starts at 0, so its values add nothing and its keys score 0;
    * ``"text"``: Li & Liang's real-word initialisation (§7.4 "Initialization"): the prefix starts as the keys and
      values the frozen model computes for the first P tokens of ``init_text`` (repeated or cut to P, as for
      prompt tuning; needs ``tokenizer``). Before training, the model on an input X then equals the base model
      on [text; X] at X's positions (notebook 04). Not with a projection: there the prefix is an MLP's output,
      and no setting of the MLP is "the text's keys and values" without solving for it.
    """
    s = _check_args(model, PREFIX_TUNING, num_virtual_tokens)
    if _checkpointing(model):
        raise ValueError(_GRADIENT_CHECKPOINTING)
    validate.optional(validate.require_int, "projection_dim", projection_dim, min=1)
    ids = _check_init(init, _INITS[PREFIX_TUNING], init_text, tokenizer, num_virtual_tokens)
    if ids is not None and projection_dim is not None:
        raise ValueError("init='text' sets the prefix itself, but with projection_dim the prefix is the output of "
                         "an MLP; drop projection_dim (a plain prefix, as Li & Liang initialise it) or use "
                         "init='random'")
    ref = next(model.parameters())
    encoder = PrefixEncoder(num_virtual_tokens, s["num_layers"], s["kv_dim"], projection_dim, device=ref.device,
                            dtype=core.adapter_dtype(ref.dtype))
    if init == "zero":
        last = encoder.embedding if projection_dim is None else encoder.transform[-1]
        for p in last.parameters():
            nn.init.zeros_(p)
    elif ids is not None:
        with torch.no_grad():
            encoder.embedding.weight.copy_(_text_key_values(model, ids))
    config = PrefixConfig(PREFIX_TUNING, num_virtual_tokens, s["num_layers"], s["num_kv_heads"], s["head_dim"],
                          s["kv_dim"], projection_dim, init, init_text if ids is not None else None)
    return _wrap(model, PrefixTuningModel, encoder, config)


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, init: str = "random",
                        init_text: str | None = None, tokenizer=None) -> PromptTuningModel:
    """Prompt tuning (Lester et al. 2021): P trainable input embeddings; return a :class:`PromptTuningModel`.

    ``init``: ``"random"`` (PyTorch's N(0, 1), PEFT's ``RANDOM``), ``"vocab"`` (embeddings of P token ids drawn
    uniformly from the vocabulary with the global torch generator, PEFT's ``SAMPLE_VOCAB``), or ``"text"``: the
    token embeddings of ``init_text`` start the prompt, repeated or cut to P tokens (PEFT's ``TEXT`` with
    ``prompt_tuning_init_text``; needs ``tokenizer``).
    """
    s = _check_args(model, PROMPT_TUNING, num_virtual_tokens)
    ids = _check_init(init, _INITS[PROMPT_TUNING], init_text, tokenizer, num_virtual_tokens)
    words = model.get_input_embeddings()
    encoder = PromptEmbedding(num_virtual_tokens, s["hidden_size"], device=words.weight.device,
                              dtype=core.adapter_dtype(next(model.parameters()).dtype))
    if init == "vocab":
        ids = torch.randint(0, words.num_embeddings, (num_virtual_tokens,), dtype=torch.long)
    if ids is not None:
        with torch.no_grad():
            encoder.embedding.weight.copy_(words(ids.to(words.weight.device)).float())
    config = PrefixConfig(PROMPT_TUNING, num_virtual_tokens, s["num_layers"], s["num_kv_heads"], s["head_dim"],
                          s["hidden_size"], None, init, init_text if init == "text" else None)
    return _wrap(model, PromptTuningModel, encoder, config)


def _check_init(init, choices: tuple[str, ...], init_text, tokenizer, num_virtual_tokens: int):
    """``init`` checked; for ``"text"`` the text's token ids repeated or cut to P (else None)."""
    validate.require_str("init", init)
    if init not in choices:
        hint = (f"; for a text initialisation pass init='text', init_text={init!r}, tokenizer=<the model's "
                "tokenizer>" if "text" in choices and (" " in init or len(init) > 8) else "")
        raise ValueError(f"init must be one of {list(choices)}, got {init!r}{hint}")
    if init != "text":
        if init_text is not None:
            raise ValueError(f"init_text is used only with init='text' (got init={init!r})")
        return None
    validate.require_str("init_text", init_text)
    if tokenizer is None:
        raise ValueError("init='text' needs tokenizer=<the model's tokenizer> to turn init_text into tokens")
    validate.require_tokenizer("tokenizer", tokenizer)
    ids = tokenizer(init_text)["input_ids"]
    if not ids:
        raise ValueError(f"init_text={init_text!r} gives no tokens")
    return torch.tensor((list(ids) * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens])


def _text_key_values(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's keys and values for the P tokens ``ids`` (at positions 0…P−1), laid out as the
    :class:`PrefixEncoder`'s table (P × 2L·d_kv): the inverse of :meth:`PrefixTuningModel.prefix_key_values`."""
    with core.eval_mode(model):  # a model with dropout would otherwise give a random prefix
        with torch.no_grad():
            out = model(input_ids=ids[None].to(next(model.parameters()).device), use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # named `cache` from transformers 5.2x
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # 2L × h_kv × P × d_h
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1).float()


def is_prefix_model(model, method: str | None = None) -> bool:
    """Whether ``model`` is a :class:`PrefixModel` (of ``method``: ``"prefix_tuning"``/``"prompt_tuning"``)."""
    kinds = {None: PrefixModel, PREFIX_TUNING: PrefixTuningModel, PROMPT_TUNING: PromptTuningModel}
    if method is not None:
        validate.require_str("method", method, choices=[PREFIX_TUNING, PROMPT_TUNING])
    return isinstance(model, kinds[method])


def _require(model) -> PrefixModel:
    if not isinstance(model, PrefixModel):
        raise TypeError(f"model must be a PrefixModel (from apply_prefix_tuning or apply_prompt_tuning), got "
                        f"{validate.describe(model)}")
    return model


@torch.no_grad()
def fold_prefix_projection(model: PrefixModel) -> PrefixModel:
    """Replace the reparameterized encoder by the prefix it computes (equation 04.4 evaluated once).

    Afterwards the prefix is a plain ``Embedding(P, L·2·d_kv)``: the same logits, no MLP to run or store —
    what PEFT saves to disk. Idempotent: a prefix without projection is left as it is. Returns ``model``.
    """
    model = _require(model)
    enc = model.prompt_encoder
    if not isinstance(model, PrefixTuningModel) or enc.projection_dim is None:
        return model
    weight = enc()
    plain = PrefixEncoder(enc.num_virtual_tokens, enc.num_layers, enc.kv_dim, None,
                          device=weight.device, dtype=weight.dtype)
    plain.embedding.weight.copy_(weight)
    plain.requires_grad_(enc.embedding.weight.requires_grad)
    model.prompt_encoder = plain
    c = model.prefix_config
    model.prefix_config = PrefixConfig(c.method, c.num_virtual_tokens, c.num_layers, c.num_kv_heads, c.head_dim,
                                       c.token_dim, None, c.init, c.init_text)
    return model


def remove_prefix(model: PrefixModel) -> nn.Module:
    """The base model object the wrapper held, with its weights exactly as they were (they never train).

    Its parameters stay frozen (``requires_grad=False``), as after ``remove_lora``; call
    ``requires_grad_(True)`` for full fine-tuning.
    """
    base = _require(model).base_model
    core.clear_config(base, _METHOD)
    return base


@contextmanager
def disable_prefix(model: PrefixModel):
    """Inside the block ``model`` computes the base model alone (forward and generate)."""
    with core.disabled([_require(model)]):
        yield model


def prefix_state_dict(model: PrefixModel) -> dict[str, torch.Tensor]:
    """PEFT's saved form: ``{"prompt_embeddings": P × (L·2·d_kv)}`` (prefix tuning, projection evaluated) or
    ``{"prompt_embeddings": P × d}`` (prompt tuning). Detached; shares storage when there is no projection."""
    return {"prompt_embeddings": _require(model).prompt_encoder().detach()}


@torch.no_grad()
def load_prefix_state_dict(model: PrefixModel, state_dict) -> PrefixModel:
    """Copy ``{"prompt_embeddings": tensor}`` into ``model``'s virtual tokens; a projected prefix is folded
    first (the file holds the prefix, not the MLP). Strict: exactly that key, the same shape; nothing changes
    when a check fails."""
    model = _require(model)
    c = model.prefix_config
    prefix_tuning = isinstance(model, PrefixTuningModel)
    width = c.num_layers * 2 * c.token_dim if prefix_tuning else c.token_dim
    # every check before the first change: folding replaces the trainable MLP, so it comes last
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping {{'prompt_embeddings': tensor}} (PEFT's prompt-learning "
                        f"format), got {validate.describe(state_dict)}")
    if set(state_dict) != {"prompt_embeddings"}:
        raise ValueError(f"expected exactly one tensor named 'prompt_embeddings' (PEFT's prompt-learning "
                         f"format), got {sorted(map(str, state_dict))}")
    value = state_dict["prompt_embeddings"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict['prompt_embeddings'] must be a tensor, got {validate.describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"state_dict['prompt_embeddings'] must hold floating-point weights, got dtype {value.dtype}")
    if tuple(value.shape) != (c.num_virtual_tokens, width):
        formula = (f"L·2·d_kv = {c.num_layers}·2·{c.token_dim}" if prefix_tuning
                   else f"d = {c.token_dim}")
        raise ValueError(f"prompt_embeddings has shape {tuple(value.shape)}, this model needs "
                         f"({c.num_virtual_tokens}, {width}): P = {c.num_virtual_tokens} virtual tokens × {formula}. "
                         "Was it made for another architecture, number of layers or prefix length?")
    fold_prefix_projection(model)
    core.load_adapter_state_dict({"prompt_embeddings": model.prompt_encoder.embedding.weight}, state_dict,
                                 what=c.method.replace("_", " "))
    return model


# ----------------------------------------------------------------------------------------------------------
# PEFT's file format and the registry entries: one tensor, "prompt_embeddings", no key prefix
# ----------------------------------------------------------------------------------------------------------

def _to_peft(model: PrefixModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's fields for ``PrefixTuningConfig``/``PromptTuningConfig``; the tensor is the prefix itself (a
    reparameterized prefix is saved evaluated, as PEFT saves it: ``prefix_projection`` stays true in the
    config, and PEFT loads it in inference mode as a plain prefix)."""
    c = model.prefix_config
    fields = {"num_virtual_tokens": c.num_virtual_tokens, "token_dim": c.token_dim,
              "num_transformer_submodules": 1, "num_attention_heads": c.num_kv_heads if
              c.method == PREFIX_TUNING else model.config.num_attention_heads,
              "num_layers": c.num_layers, "modules_to_save": None}
    if c.method == PREFIX_TUNING:
        fields.update(encoder_hidden_size=c.projection_dim or c.token_dim,
                      prefix_projection=c.projection_dim is not None,
                      init_weights="zero" if c.init == "zero" else None)
    else:
        init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[c.init]
        name = getattr(model.config, "_name_or_path", "") or "tiny"
        fields.update(prompt_tuning_init=init, prompt_tuning_init_text=c.init_text, tokenizer_kwargs=None,
                      tokenizer_name_or_path=str(name) if init == "TEXT" else None)
    return fields, prefix_state_dict(model)


def _from_peft(method: str):
    """Wrap a model as PEFT's prompt-learning fields say (the virtual tokens are loaded after)."""
    def apply(model: nn.Module, fields: dict) -> PrefixModel:
        for name in ("num_virtual_tokens", "num_layers", "token_dim"):
            if name not in fields:
                raise ValueError(f"the adapter's config lacks the {method} field {name!r}")
        if (fields.get("num_transformer_submodules") or 1) != 1:
            raise ValueError(f"this adapter has num_transformer_submodules={fields['num_transformer_submodules']} "
                             "(an encoder-decoder model); peft_lab supports decoder-only models")
        if fields.get("modules_to_save"):
            raise ValueError(f"this adapter also trains modules_to_save={fields['modules_to_save']!r}, which "
                             "peft_lab.prefix does not implement")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"expected a transformers causal LM, got {type(model).__name__}")
        shapes = prefix_shapes(model.config)
        width = shapes["kv_dim"] if method == PREFIX_TUNING else shapes["hidden_size"]
        made = {"num_layers": fields["num_layers"], "token_dim": fields["token_dim"]}
        here = {"num_layers": shapes["num_layers"], "token_dim": width}
        if made != here:
            raise ValueError(f"this {method} adapter was made for another architecture: its config says {made} "
                             f"(base {fields.get('base_model_name_or_path')!r}), this model has {here}")
        wrap = apply_prefix_tuning if method == PREFIX_TUNING else apply_prompt_tuning
        return wrap(model, num_virtual_tokens=fields["num_virtual_tokens"])
    return apply


def _memory_spec(config: PrefixConfig, model_config) -> dict:
    """The calculator's spec (``estimate``) for a prefix or prompt of this config."""
    if config.method == PROMPT_TUNING:
        return {"kind": "prompt", "num_virtual_tokens": config.num_virtual_tokens}
    return {"kind": "prefix", "num_virtual_tokens": config.num_virtual_tokens,
            "projection_dim": config.projection_dim}


def _apply_config(model: nn.Module, config: PrefixConfig) -> PrefixModel:
    """Apply the method of ``config`` (its size fields are the model's and are checked against it)."""
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"config must be a PrefixConfig, got {validate.describe(config)}")
    if config.init == "text":
        raise ValueError("init='text' needs the model's tokenizer: call apply_prefix_tuning/apply_prompt_tuning "
                         "with init_text= and tokenizer=")
    if config.method == PREFIX_TUNING:
        wrapped = apply_prefix_tuning(model, config.num_virtual_tokens, config.projection_dim, config.init)
    else:
        wrapped = apply_prompt_tuning(model, config.num_virtual_tokens, config.init)
    made = {k: getattr(config, k) for k in ("num_layers", "num_kv_heads", "head_dim", "token_dim")}
    here = {k: getattr(wrapped.prefix_config, k) for k in made}
    if made != here:
        remove_prefix(wrapped)
        raise ValueError(f"this {config.method} config was made for another architecture ({made}; the model "
                         f"has {here})")
    return wrapped


for _method, _label in ((PREFIX_TUNING, "prefix tuning"), (PROMPT_TUNING, "prompt tuning")):
    registry.register(registry.Method(
        name=_method, label=_label, config_class=PrefixConfig, apply=_apply_config,
        present=lambda model, method=_method: is_prefix_model(model, method),
        disable=disable_prefix, remove=remove_prefix, state_dict=prefix_state_dict,
        load_state_dict=load_prefix_state_dict, config_of=lambda model: _require(model).prefix_config,
        serve=fold_prefix_projection if _method == PREFIX_TUNING else None,
        served_as="projection folded" if _method == PREFIX_TUNING else "as trained",
        peft_type=_method.upper(), to_peft=_to_peft, from_peft=_from_peft(_method), peft_key_prefix="",
        memory={"prefix": registry.MethodShape(lowest=registry.STAGES["qkv"] + 0.5, prefix=True,
                                               required=("num_virtual_tokens",), optional=("projection_dim",))}
        if _method == PREFIX_TUNING else
        # the virtual tokens sit at the input: everything is kept
        {"prompt": registry.MethodShape(lowest=-1.0, prompt=True, required=("num_virtual_tokens",))},
        memory_spec=_memory_spec,
    ))
