"""The analytic memory of one AdamW training step, for models too large to run (notebook 00, "The memory
arithmetic of full fine-tuning", equations (1)–(3) and (6); notebook 06, "Memory at real sizes").

:func:`estimate_memory` gives the same keys as :func:`peft_lab.measure.measure_memory` from sizes alone:
parameters, gradients and optimizer state from the parameter count and the precision, activations from
:func:`activation_elements`, which counts what autograd saves tensor by tensor. Each PEFT method is
described by a :class:`MethodShape` that its module registers (:func:`method_shapes`, :mod:`peft_lab.registry`)
— where its lowest trainable parameter sits and what its own modules keep — so a new method touches nothing here.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from . import arch, core, registry, validate
from .measure import MEMORY_KEYS
from .registry import STAGES, MethodShape

__all__ = ["PRECISIONS", "QUANTIZED_BASE", "STAGES", "MethodShape", "method_shapes", "activation_elements",
           "estimate_memory", "dropout_of", "method_spec"]

# Bytes per parameter for AdamW training, by precision (notebook 00, equations (1)–(3)).
# "bf16-mixed" is the convention of Rajbhandari et al. 2020 (ZeRO, section 3.1): bf16/fp16 weights (2 B) and
# gradients (2 B); an fp32 master copy of the weights (4 B) and Adam's two fp32 moments (8 B) — 16 B per
# trained parameter. ZeRO books the master copy under "optimizer states" (K = 12); we book it under
# "parameters", where it sits in memory next to the bf16 copy. Frozen parameters need only their 2 B.
PRECISIONS = {
    #               weight, master copy, gradient, Adam moments, activation element
    "fp32": dict(weight=4, master=0, grad=4, adam=8, act=4),
    "bf16-mixed": dict(weight=2, master=4, grad=2, adam=8, act=2),
}
# A frozen base stored in 4 bits (QLoRA's NF4 + 0.127 bits of double-quantized constants per weight), the
# method trained in bf16-mixed: a precision for PEFT methods only (estimate_memory's ``method``).
QUANTIZED_BASE = {"4bit-base": dict(PRECISIONS["bf16-mixed"], base_weight=(4 + 0.127) / 8)}

# Tensors of width d_ff that the MLP activation function saves for backward (per token, per layer).
# GPT-2's "gelu_new" is written out in Python (0.5·x·(1+tanh(√(2/π)(x+0.044715x³)))), and autograd keeps four
# intermediate tensors of it; fused activations (F.gelu, SiLU, ReLU) keep one.
_ACT_SAVED = {"gelu_new": 4}

# The stage of each linear layer LoRA may wrap, by name as PEFT's suffix rule matches it.
_LINEAR_STAGES = {
    "gpt2": {"attn.c_attn": 1, "attn.c_proj": 3, "mlp.c_fc": 6, "mlp.c_proj": 8},
    "llama": {"self_attn.q_proj": 1, "self_attn.k_proj": 1, "self_attn.v_proj": 1, "self_attn.o_proj": 3,
              "mlp.gate_proj": 6, "mlp.up_proj": 6, "mlp.down_proj": 8},
}


def method_shapes() -> dict[str, MethodShape]:
    """Calculator kind → :class:`MethodShape`: full fine-tuning, and every registered method's kinds (each method
    module states its own in its registry entry, :mod:`peft_lab.registry`)."""
    shapes = {"full": _FULL}
    for method in registry.methods().values():
        shapes.update(method.memory)
    return shapes


_FULL = MethodShape(lowest=-1.0)  # every tensor of every block trains


def method_spec(method, model_config=None) -> dict:
    """``method`` checked: a known ``kind``, its required fields present, no unknown field, counts positive
    integers, module names normalised by :func:`peft_lab.core.module_names` (one string is a regex). A method's
    own config (``LoRAConfig(rank=8)``, ``BottleneckConfig(...)``, ...) is turned into that mapping by its
    registry entry; its default targets need ``model_config``."""
    if method is None:
        return {"kind": "full"}
    entry = registry.config_method(method)
    if entry is not None:
        if entry.memory_spec is None:
            raise ValueError(f"the calculator has no formula for {entry.label}")
        if model_config is None:
            raise ValueError(f"a {type(method).__name__} needs the model's config to resolve its targets")
        method = entry.memory_spec(method, model_config)
    validate.require_mapping("method", method)
    spec = dict(method)
    kind = spec.pop("kind", None)
    shapes = method_shapes()
    if kind not in shapes:
        raise ValueError(f"method kind must be one of {sorted(shapes)}, got {kind!r}")
    required, optional = shapes[kind].required, shapes[kind].optional
    unknown = sorted(set(spec) - set(required) - set(optional))
    if unknown:
        close = {u: difflib.get_close_matches(u, required + optional, n=1) for u in unknown}
        hints = "; ".join(f"{u!r} (did you mean {c[0]!r}?)" if c else repr(u) for u, c in close.items())
        raise ValueError(f"method {kind!r} has no field {hints}; its fields are "
                         f"{list(required) + list(optional)}")
    missing = [f for f in required if f not in spec]
    if missing:
        raise ValueError(f"method {kind!r} needs {missing}; e.g. "
                         + ", ".join(f"{f!r}: ..." for f in required))
    for name in ("rank", "bottleneck_dim", "num_virtual_tokens", "projection_dim"):
        if name in spec and not (name == "projection_dim" and spec[name] is None):
            spec[name] = validate.require_int(f"method[{name!r}]", spec[name], min=1)
    for name in ("targets", "feedforward"):
        if name in spec:
            spec[name] = core.module_names(spec[name], f"method[{name!r}]", allow_empty=name == "feedforward")
    return {"kind": kind, **spec}


_DROPOUTS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout", "dropout")


def dropout_of(config) -> float:
    """The largest dropout probability a transformers ``config`` sets (0.0 when none)."""
    return max([float(getattr(config, name, 0.0) or 0.0) for name in _DROPOUTS])


def activation_elements(config, batch_size: int, seq_len: int, method: Mapping | None = None) -> tuple[int, int]:
    """``(float_elements, int64_elements)`` autograd saves in one forward pass (notebook 00, eq. (6)).

    Counted tensor by tensor for the Hugging Face GPT-2 and LLaMA blocks with PyTorch's SDPA attention
    (which never stores the T×T attention matrix), dropout 0 and an unpadded batch. With ``n = B·T`` tokens,
    ``d`` width, ``h`` heads, ``f`` MLP width, ``V`` vocabulary, ``L`` layers, full fine-tuning (``method=None``):

    GPT-2 block, per token: LayerNorm saves its input and mean/rstd (d + 2), twice; c_attn's input (d);
    SDPA keeps q, k, v (the 3d c_attn output plus two contiguous copies on CPU, 2d), its output (d, also
    c_proj's input) and a log-sum-exp per head (h); c_fc's input (d); the activation (4f for gelu_new, else
    f); c_proj's input (f)::

        per_layer = 10d + h + 4 + (k_act + 1)·f        (= 30d + h + 4 for f = 4d, gelu_new)
        head      = (d + 2) + d + V                    (final LayerNorm, lm_head input, logits for the loss)
        floats    = n·(L·per_layer + head);  int64 = 2n + T (token ids, targets, position ids)

    LLaMA block, per token: RMSNorm saves x, rstd and the normalised x (2d + 1), the projections' input (d),
    twice; attention keeps rotated q (d), rotated k and v (2·d_kv), output (d) and log-sum-exp (h); the MLP
    keeps gate output, SiLU output, up output and down_proj input (4f); RoPE's cos and sin are saved once for
    all layers (2·T·d/h)::

        per_layer = 8d + 2 + 2·d_kv + h + 4f;  head = 3d + 1 + V
        floats    = n·(L·per_layer + head) + 2·T·d/h;  int64 = 2n

    ``method`` describes a frozen base with a PEFT method (notebook 06, "Memory at real sizes"), as a mapping
    ``{"kind": ..., settings}`` with a kind of :func:`method_shapes`: ``"lora"`` (``rank``, ``targets``: module
    names; ``use_dora: True`` for DoRA), ``"ia3"`` (``targets``, ``feedforward``: module names, PEFT's suffix
    rules), ``"pfeiffer"``, ``"houlsby"`` and ``"parallel"`` (``bottleneck_dim``), ``"prefix"``
    (``num_virtual_tokens``, optional ``projection_dim``), ``"prompt"`` (``num_virtual_tokens``), or ``"full"``.
    Two rules change the count when the base is frozen:

    1. a frozen linear layer saves nothing (its input is needed only for its own weight's gradient), unless
       LoRA wraps it: then ``A`` needs that input (d) and ``B`` needs ``A``'s output (r);
    2. nothing *below the lowest trainable parameter* is saved (:data:`STAGES`): no gradient has to pass
       there. LoRA on ``c_attn`` skips layer 0's first norm; a Pfeiffer or parallel adapter all of layer 0 but
       itself; prompt tuning's virtual tokens sit at the input, so everything above them is kept.

    The method's own tensors come on top (:class:`MethodShape`); a prefix adds its P keys and values per layer
    and sequence (the full ``h`` heads when grouped-query attention has to repeat them because a mask is
    present) and a float attention mask ``B·T·(T+P)`` per layer (the cache rules out the implicit causal
    mask); prompt tuning runs every layer on ``T + P`` positions. For full fine-tuning and every method these
    rules reproduce ``measure_memory`` to the byte on CPU for small GPT-2 and LLaMA configs
    (tests/test_memory_methods.py).

    A config with dropout > 0 is refused: dropout keeps a mask per dropped tensor, and with attention dropout
    CPU SDPA falls back to a kernel that stores the T×T attention probabilities — a count that depends on the
    device. Not included: a padded batch makes every layer's attention save a B×1×T×T float mask (4·L·B·T²
    bytes, 0.5% of the tiny model's activations on a task batch); ``attn_implementation="eager"`` adds the h·T
    attention probabilities per token per layer; CUDA SDPA kernels may keep q, k, v without the two CPU
    copies (2d less per token per layer).
    """
    spec = method_spec(method, config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BLOCKS:
        raise ValueError(f"no activation formula for model_type {model_type!r}; known: {sorted(_BLOCKS)}")
    if dropout_of(config) > 0:
        fields = ", ".join(f"{k}={getattr(config, k)}" for k in _DROPOUTS if getattr(config, k, 0))
        raise ValueError(f"the config sets dropout ({fields}); "
                         "this calculator counts dropout 0 and would under-estimate a model that trains with "
                         "dropout (masks, and on CPU the T×T attention probabilities). Set those fields to 0 in "
                         "the config (build_from_config does), or measure the model with measure_memory")
    block = _BLOCKS[model_type](config)
    on = _Trained(spec, block)
    P = spec["num_virtual_tokens"] if on.shape.prefix or on.shape.prompt else 0
    n = batch_size * (seq_len + P) if on.shape.prompt else batch_size * seq_len  # positions every layer computes
    floats = sum(_layer_floats(block, on, layer, n, batch_size, seq_len, P) for layer in range(block.L))
    if on.shape.prefix and spec.get("projection_dim"):
        floats += P * spec["projection_dim"]          # tanh output of the reparameterization
    floats += n * block.norm(on.full)                      # final norm
    floats += n * block.d if on.full else 0                # lm_head input (lm_head trained with the model)
    floats += n * block.V                                  # logits, kept for the loss
    floats += block.rope * (seq_len + P if on.shape.prompt else seq_len)  # RoPE cos and sin, saved once
    ints = n                                               # targets of the loss
    if on.full:
        ints += batch_size * seq_len + block.position_ids * seq_len  # token ids (embedding grad), position ids
    return floats, ints


# ----------------------------------------------------------------------------------------------------------
# activation_elements, in parts: one block counter per architecture, the method's changes carried by _Trained
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Block:
    """One architecture's sizes and the floats per token its parts keep (notebook 00 §5's count).

    ``sizes``: (d_in, d_out) of each linear layer by name; ``stages``: each layer's stage (:data:`STAGES`);
    ``names``: the block's module-name prefix; ``attn(prefix)``: what attention keeps; ``mlp``: the activation's
    tensors; ``kv_prefix``: floats per virtual token of a prefix; ``rope``: RoPE's cos and sin (2·d_h per
    position, saved once); ``position_ids``: 1 where a learned position embedding needs the ids.
    """

    model_type: str
    d: int
    h: int
    L: int
    V: int
    f: int
    hd: int
    d_kv: int
    sizes: dict
    stages: dict
    names: str
    mlp: int
    rope: int
    position_ids: int

    def norm(self, full: bool) -> int:
        """LayerNorm keeps its input, mean and rstd; RMSNorm x and rstd (+ the normalised x for its weight)."""
        if self.model_type == "gpt2":
            return self.d + 2
        return self.d + 1 + (self.d if full else 0)


def _gpt2_block(config) -> _Block:
    d, f = config.n_embd, config.n_inner or 4 * config.n_embd
    return _Block("gpt2", d, config.n_head, config.n_layer, config.vocab_size, f, d // config.n_head, d,
                  {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f), "mlp.c_proj": (f, d)},
                  _LINEAR_STAGES["gpt2"], "transformer.h.{}.", _ACT_SAVED.get(config.activation_function, 1) * f,
                  rope=0, position_ids=1)


def _llama_block(config) -> _Block:
    d, h = config.hidden_size, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // h
    d_kv, f = (config.num_key_value_heads or h) * hd, config.intermediate_size
    sizes = {"self_attn.q_proj": (d, h * hd), "self_attn.k_proj": (d, d_kv), "self_attn.v_proj": (d, d_kv),
             "self_attn.o_proj": (h * hd, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    return _Block("llama", d, h, config.num_hidden_layers, config.vocab_size, f, hd, d_kv, sizes,
                  _LINEAR_STAGES["llama"], "model.layers.{}.", 3 * f,  # gate out, SiLU out, up out
                  rope=2 * hd, position_ids=0)


_BLOCKS = {"gpt2": _gpt2_block, "llama": _llama_block}


class _Trained:
    """What the method trains in a block, read from its spec: which linear layers it wraps (PEFT's rules,
    :func:`peft_lab.core.matches_target`), the stage of its lowest trainable parameter (rule 2), and the
    per-token tensors of LoRA's ``B`` inputs, IA3's products and DoRA's terms."""

    def __init__(self, spec: dict, block: _Block):
        self.kind, self.full = spec["kind"], spec["kind"] == "full"
        self.shape = method_shapes()[self.kind]
        self.rank, self.m = spec.get("rank", 0), spec.get("bottleneck_dim", 0)  # 0 where the kind has none
        targets = spec.get("targets", ())
        wraps = {frozenset(x for x in block.stages if core.matches_target(block.names.format(i) + x, targets))
                 for i in range(block.L)}
        if len(wraps) > 1:
            raise ValueError(f"targets {targets!r} wrap different layers in different blocks; this calculator "
                             "counts a method applied alike in every block: name the layers, e.g. ['c_attn']")
        self.wrapped = next(iter(wraps))
        lowest = self.shape.lowest
        if lowest is None:  # LoRA, IA3: the stage of the lowest wrapped layer
            hits = [block.stages[x] for x in self.wrapped]
            if not hits:
                raise ValueError(f"{self.kind} targets {targets!r} name no linear layer of this {block.model_type} "
                                 f"block; known: {sorted(block.stages)}")
            lowest = float(min(hits))
        self.lowest = lowest
        self.dora = self.kind == "lora" and bool(spec.get("use_dora", False))
        # IA3: per token and layer, the unscaled tensor each product keeps (input side: PEFT's endswith rule)
        feedforward = spec.get("feedforward", ())
        self.ia3_kept = sum(block.sizes[x][0] if core.ends_with_module(block.names.format(0) + x, feedforward)
                            else block.sizes[x][1] for x in self.wrapped if self.kind == "ia3")

    def lora(self, *names: str) -> int:
        """How many of these linear layers LoRA wraps."""
        return sum(self.kind == "lora" and x in self.wrapped for x in names)

    def kept(self, stage: str, layer: int) -> bool:
        """Rule 2: a tensor at ``stage`` is kept unless, in the first block, it sits below the lowest trained."""
        return self.full or layer > 0 or STAGES[stage] > self.lowest


def _layer_floats(b: _Block, on: _Trained, layer: int, n: int, B: int, T: int, P: int) -> int:
    """Floats one block keeps for backward: the architecture's parts, rule 1 (a frozen linear layer keeps its
    input only when LoRA wraps it) and rule 2 (:meth:`_Trained.kept`), plus the method's own tensors."""
    full, d = on.full, b.d
    if b.model_type == "gpt2":
        q_lora = on.lora("attn.c_attn")
        attn = 6 * d + b.h                                 # q, k, v, two copies, output, log-sum-exp
        o_lora, gu_lora, down_lora = on.lora("attn.c_proj"), on.lora("mlp.c_fc"), on.lora("mlp.c_proj")
        mlp, kv_prefix = b.mlp, 2 * b.d_kv
    else:
        q_lora = on.lora("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        attn = 2 * d + 2 * b.d_kv + b.h                    # rotated q, k, v, output, log-sum-exp
        o_lora, gu_lora = on.lora("self_attn.o_proj"), on.lora("mlp.gate_proj", "mlp.up_proj")
        down_lora, mlp = on.lora("mlp.down_proj"), b.mlp
        if not (full or layer > 0 or on.lowest < STAGES["ffn_in"] or "mlp.gate_proj" in on.wrapped):
            mlp = b.f  # layer 0, up_proj the lowest trained: SiLU(gate) is a constant, kept for up's gradient
        kv_prefix = 2 * (d if b.d_kv < d else b.d_kv)      # with a mask, SDPA gets k, v repeated to all heads
        if on.shape.prefix and b.d_kv < d:
            attn += 2 * (d - b.d_kv)
    floats = n * on.rank * (q_lora + o_lora + gu_lora + down_lora)  # rule 1: B's input, r per wrapped layer
    floats += n * on.ia3_kept
    if on.dora:  # (05.10): W₀x̃ and B A x̃ per token (2·d_out); n and m/n per layer, and m/n − 1 where W₀x̃ needs
        for x in on.wrapped:                                # a gradient (above the lowest trained stage)
            d_out = b.sizes[x][1]
            floats += 2 * n * d_out + d_out * (3 if layer > 0 or b.stages[x] > on.lowest else 2)
    floats += n * b.norm(full) if on.kept("norm", layer) else 0
    floats += n * d if full or q_lora else 0
    if on.kept("attention", layer):
        floats += n * attn
        if on.shape.prefix:
            floats += B * P * kv_prefix + B * T * (T + P)
    elif o_lora:
        floats += n * d                                    # o_proj's input, not kept by the attention
    floats += n * on.shape.after_attention(d, on.m)
    floats += n * b.norm(full) if on.kept("ffn_norm", layer) else 0
    floats += n * d if full or gu_lora else 0
    floats += n * mlp if on.kept("activation", layer) else 0
    floats += n * b.f if full or down_lora else 0
    floats += n * on.shape.after_ffn(d, on.m, layer)
    return floats


def estimate_memory(name_or_config, trainable_params: int | None = None, batch_size: int = 1,
                    seq_len: int | None = None, precision: str = "fp32",
                    method: Mapping | None = None) -> dict[str, int]:
    """Analytic bytes of one AdamW training step, for models too large to run (notebook 00, eqs. (1)–(3), (6)).

    Same keys as :func:`measure_memory`. ``name_or_config`` is an architecture name of
    :func:`peft_lab.build_from_config` (``"gpt2"`` … ``"llama-7b"``, ``"tiny"``) or a transformers config;
    the parameter count N comes from building it on the meta device (exact, nothing allocated).
    ``trainable_params=None`` means full fine-tuning (every parameter trained); a number means a frozen base
    plus that many trained parameters (LoRA, adapters, ...), counted *among* the model's N (an adapter's own
    weights, a fraction of a percent of N, are not added). Bytes per parameter (see :data:`PRECISIONS`):

    * ``"fp32"``: weights 4·N, gradients 4·N_t, Adam moments 8·N_t — 16 B per trained parameter.
    * ``"bf16-mixed"``: weights 2·N plus an fp32 master copy 4·N_t, bf16 gradients 2·N_t, fp32 Adam 8·N_t —
      again 16 B per trained parameter, the mixed-precision Adam figure of Rajbhandari et al. 2020 (ZeRO);
      activations are counted at 2 B each (a slight under-estimate: autocast keeps the loss in fp32).

    Activations come from :func:`activation_elements` for a ``batch_size × seq_len`` batch (``seq_len`` defaults
    to the model's context length; ``batch_size=0`` gives the model states alone). They are those of full
    fine-tuning; with a frozen base autograd saves a little less (a frozen linear layer does not need its
    input), so for PEFT they are an upper bound. For fp32 the formula matches :func:`measure_memory` on CPU to
    within 1% for the tiny model and small GPT-2s (tests/test_measure.py).

    ``method`` (notebook 06) makes the estimate exact for a PEFT method: a mapping as in
    :func:`activation_elements` (e.g. ``{"kind": "lora", "rank": 8, "targets": ["c_attn"]}``). Then
    ``trainable_params`` is the method's own parameter count, *added* to N (an adapter's weights exist on
    top of the base), and the activations follow the frozen-base rules of :func:`activation_elements`.
    ``precision="4bit-base"`` (with a method) stores the frozen base in 4 bits, QLoRA's NF4 with double
    quantization: 0.5 B per weight plus 0.127 bits of quantization constants (Dettmers et al. 2023, §3);
    the method trains in bf16-mixed. Embeddings, output head and norms are counted as 4-bit too (QLoRA keeps
    them in 16 bits: about a third of gpt2-small's weights, 4% of LLaMA-2 7B's), so this is a lower bound for
    the parameters (notebook 06 §8 prints by how much).
    """
    from .models import meta_size

    validate.require_str("precision", precision, choices=sorted(PRECISIONS) + sorted(QUANTIZED_BASE))
    batch_size = validate.require_int("batch_size", batch_size, min=0)
    config, total = meta_size(name_or_config)
    if method is not None:
        method = method_spec(method, config)
    peft_method = method is not None and method["kind"] != "full"
    if peft_method and trainable_params is None:
        raise ValueError("with a PEFT method, trainable_params is the method's own parameter count "
                         "(e.g. from count_parameters after applying it)")
    if trainable_params is None:
        trainable_params = total
    trainable_params = validate.require_int("trainable_params", trainable_params, min=0, max=total)
    context = arch.context_length(config)
    # A sequence longer than the context does not run on the model, so it has no memory figure.
    seq_len = context if seq_len is None else validate.require_int("seq_len", seq_len, min=1, max=context)
    b = PRECISIONS.get(precision) or QUANTIZED_BASE[precision]
    base_weight = b["weight"]
    if precision in QUANTIZED_BASE and not peft_method:
        raise ValueError(f'precision={precision!r} keeps the base frozen in 4 bits: give a PEFT method, '
                         'e.g. method={"kind": "lora", "rank": 8, "targets": ["c_attn"]}')
    if peft_method:
        trained, stored = trainable_params, total + trainable_params  # the adapter sits on top of the base
        base_weight = b.get("base_weight", b["weight"])
    else:
        trained, stored = (total if method is not None else trainable_params), total
    out = {
        "parameters": int(base_weight * total + b["weight"] * (stored - total) + b["master"] * trained),
        "gradients": b["grad"] * trained,
        "optimizer": b["adam"] * trained,
    }
    if batch_size == 0 or trained == 0:
        out["activations"] = 0
    else:
        floats, ints = activation_elements(config, batch_size, seq_len, method)
        out["activations"] = b["act"] * floats + 8 * ints + 4  # + the fp32 scalar loss
    out["total"] = sum(out[k] for k in MEMORY_KEYS)
    return out
