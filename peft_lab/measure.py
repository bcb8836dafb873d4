"""Measurement: parameter counts in PEFT's format, memory of a training step, timing.

Notebook 00 ("The memory arithmetic of full fine-tuning") and every method notebook's "Measure" section.
"""
from __future__ import annotations

import statistics
import time
from functools import lru_cache
from collections.abc import Callable, Mapping

import torch


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters; tied weights are counted once, as PEFT does."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print the line PEFT's ``print_trainable_parameters`` prints, character for character."""
    t, a = count_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")


# ---------------------------------------------------------------------------------------------------------
# Memory of one training step (notebook 00, "The memory arithmetic of full fine-tuning")
# ---------------------------------------------------------------------------------------------------------

MEMORY_KEYS = ("parameters", "gradients", "optimizer", "activations")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _check_batch(batch) -> None:
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError("batch is empty: pass a dict with at least input_ids (and usually attention_mask, "
                         "labels), e.g. peft_lab.collate(examples, pad_id)")
    if "input_ids" not in batch:
        raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"batch['input_ids'] must be a tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"batch['input_ids'] must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError("batch['input_ids'] is empty (no tokens)")


def measure_memory(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes needed by ONE AdamW training step of ``model`` on ``batch``, by tensor accounting.

    Returns ``{"parameters", "gradients", "optimizer", "activations", "total"}`` (bytes, ints), plus
    ``"cuda_peak"`` when the model lives on a CUDA device. Notebook 00, "Measuring a training step".

    How each part is counted (valid on any device, CPU included):

    * ``parameters``: every parameter's ``numel * element_size`` (tied weights once).
    * ``gradients``: the same for the trainable parameters only: ``.grad`` has the parameter's dtype.
    * ``optimizer``: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in the parameter's
      dtype, so twice the gradient bytes (the scalar ``step`` counter is ignored).
    * ``activations``: one forward pass runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor
      autograd saves for the backward pass goes through the pack hook. Each *storage* is counted once, at its
      full size (a view keeps its whole storage alive), and storages that belong to parameters are left out
      (autograd saves weights too, but they are already counted). Integer tensors the graph keeps (token ids,
      targets) are included; they are small.

    Assumptions and what this leaves out: it counts what is *live at the end of the forward pass* — the
    usual peak of a step — not the allocator's view. Temporary buffers inside kernels, intermediate results
    freed during the forward, the logits returned to the caller when autograd did not save them, CUDA
    context and caching-allocator overhead and fragmentation are not included. The total is also a slight
    *over*-estimate of a real peak: during backward activations are freed while gradients appear, and
    AdamW's state is created after backward in the first step. It describes the model as given: in train
    mode, without gradient checkpointing, at its current dtype (no autocast).

    On CUDA a real step is run as well: two AdamW steps with ``lr=0`` (the weights do not move), and
    ``torch.cuda.max_memory_allocated`` during the second one — the steady state, with optimizer state,
    activations and gradients live together — is reported as ``"cuda_peak"`` (it also counts anything else
    already allocated on that GPU).

    The model's weights are not changed: forward and backward run, no update is applied; gradients are
    restored to what they were before the call (usually ``None``), the train/eval mode too, and the random
    number generator state is forked so dropout draws do not disturb the caller.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _check_batch(batch)
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    device = params[0].device
    if device.type == "meta":
        raise ValueError("a model on the meta device has no data to run; use estimate_memory for its size")
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    trainable = [p for p in params if p.requires_grad]

    out = {"parameters": sum(p.numel() * p.element_size() for p in params)}
    out["gradients"] = sum(p.numel() * p.element_size() for p in trainable)
    out["optimizer"] = 2 * out["gradients"]

    param_storages = {_storage_key(p) for p in params}
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_storages and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    old_grads = [p.grad for p in params]
    devices = [device] if device.type == "cuda" else []
    try:
        model.train()
        with torch.random.fork_rng(devices=devices):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = _loss(model, batch)
            if loss.requires_grad:  # with every parameter frozen there is no graph and nothing to save
                loss.backward()
            del loss
            out["activations"] = sum(saved.values())
            out["total"] = sum(out[k] for k in MEMORY_KEYS)
            if device.type == "cuda" and trainable:
                out["cuda_peak"] = _cuda_peak(model, batch, trainable)
    finally:
        for p, g in zip(params, old_grads):
            p.grad = g
        model.train(was_training)
    return out


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    return model(**batch).loss


def _cuda_peak(model, batch, trainable) -> int:
    for p in trainable:
        p.grad = None
    opt = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0)  # lr=0: p - 0 * update == p exactly
    try:
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            if step == 1:  # the steady-state step: optimizer state already exists
                torch.cuda.synchronize(trainable[0].device)
                torch.cuda.reset_peak_memory_stats(trainable[0].device)
            _loss(model, batch).backward()
            opt.step()
        torch.cuda.synchronize(trainable[0].device)
        return int(torch.cuda.max_memory_allocated(trainable[0].device))
    finally:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        del opt
        torch.cuda.empty_cache()


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

    ``method`` describes a frozen base with a PEFT method (notebook 05, "Memory at real sizes"), as a mapping
    ``{"kind": ..., settings}``: ``"lora"`` (``rank``, ``targets``: module names), ``"pfeiffer"`` and
    ``"houlsby"`` (``bottleneck_dim``), ``"prefix"`` (``num_virtual_tokens``, optional ``projection_dim``),
    ``"prompt"`` (``num_virtual_tokens``), or ``"full"``. Two rules change the count when the base is frozen:

    1. a frozen linear layer saves nothing (its input is needed only for its own weight's gradient), unless
       LoRA wraps it: then ``A`` needs that input (d) and ``B`` needs ``A``'s output (r);
    2. nothing *below the lowest trainable parameter* is saved: no gradient has to pass there. LoRA on
       ``c_attn`` skips layer 0's first norm; a Pfeiffer adapter (after the MLP) all of layer 0 but itself;
       prompt tuning's virtual tokens sit at the input, so everything above them is kept.

    The method's own tensors come on top: a bottleneck adapter saves its input (d) and m (ReLU) or 2m (SiLU);
    a prefix adds its P keys and values per layer and sequence (the full ``h`` heads when grouped-query
    attention has to repeat them because a mask is present) and a float attention mask ``B·T·(T+P)`` per layer
    (the cache rules out the implicit causal mask); prompt tuning runs every layer on ``T + P`` positions. For
    full fine-tuning and every method these rules reproduce ``measure_memory`` to the byte on CPU for small
    GPT-2 and LLaMA configs (tests/test_measure.py).

    Not included: a padded batch makes every layer's attention save a B×1×T×T float mask (4·L·B·T² bytes, 0.5%
    of the tiny model's activations on a task batch); dropout > 0 adds masks;
    ``attn_implementation="eager"`` adds the h·T attention probabilities per token per layer; CUDA SDPA
    kernels may keep q, k, v without the two CPU copies (2d less per token per layer).
    """
    spec = dict(method or {"kind": "full"})
    kind = spec.get("kind")
    if kind not in _METHOD_KINDS:
        raise ValueError(f"method kind must be one of {sorted(_METHOD_KINDS)}, got {kind!r}")
    arch = getattr(config, "model_type", None)
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"no activation formula for model_type {arch!r}; known: 'gpt2', 'llama'")
    full = kind == "full"
    B, T = batch_size, seq_len
    P = int(spec.get("num_virtual_tokens", 0)) if kind in ("prefix", "prompt") else 0
    n = B * (T + P) if kind == "prompt" else B * T      # positions every layer computes
    rank, m = int(spec.get("rank", 0)), int(spec.get("bottleneck_dim", 0))
    targets = tuple(spec.get("targets", ()))
    if arch == "gpt2":
        d, h, L, V = config.n_embd, config.n_head, config.n_layer, config.vocab_size
        f = config.n_inner or 4 * d
        k_act = _ACT_SAVED.get(config.activation_function, 1)
        hd, d_kv, stages = d // h, d, _GPT2_STAGES
    else:
        d, h, L, V = config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.vocab_size
        hd = getattr(config, "head_dim", None) or d // h
        d_kv = (config.num_key_value_heads or h) * hd
        f, stages = config.intermediate_size, _LLAMA_STAGES

    def lora(*names):  # how many of these linear layers LoRA wraps (PEFT's suffix rule)
        return sum(kind == "lora" and any(x == t or x.endswith("." + t) for t in targets) for x in names)

    # Rule 2: the stage (in forward order within a block) of the lowest trainable parameter, in layer 0.
    if full or kind == "prompt":
        lowest = -1.0
    elif kind == "lora":
        hits = [stage for name, stage in stages.items() if lora(name)]
        if not hits:
            raise ValueError(f"LoRA targets {targets!r} name no linear layer of this {arch} block; "
                             f"known: {sorted(stages)}")
        lowest = float(min(hits))
    else:
        lowest = {"houlsby": 4.0, "pfeiffer": 9.0, "prefix": 1.5}[kind]

    def grad_through(layer: int, stage: float) -> bool:
        return full or layer > 0 or stage > lowest

    floats = 0
    for layer in range(L):
        g = lambda stage: grad_through(layer, stage)  # noqa: E731
        if arch == "gpt2":
            norm = d + 2                                   # LayerNorm: input, mean, rstd
            qkv_in = full or lora("attn.c_attn")
            attn = 6 * d + h                               # q, k, v, two copies, output, log-sum-exp
            o_lora, up_in, down_in = lora("attn.c_proj"), full or lora("mlp.c_fc"), full or lora("mlp.c_proj")
            mlp = k_act * f
            rank_total = rank * (lora("attn.c_attn") + o_lora + lora("mlp.c_fc") + lora("mlp.c_proj"))
            kv_prefix = 2 * d_kv
        else:
            norm = d + 1 + (d if full else 0)              # RMSNorm: x, rstd (+ normalised x for its weight)
            q_lora = lora("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            qkv_in = full or q_lora
            attn = 2 * d + 2 * d_kv + h                    # rotated q, k, v, output, log-sum-exp
            o_lora = lora("self_attn.o_proj")
            gu_lora = lora("mlp.gate_proj", "mlp.up_proj")
            up_in, down_in = full or gu_lora, full or lora("mlp.down_proj")
            mlp = 3 * f                                    # gate out, SiLU out, up out
            rank_total = rank * (q_lora + o_lora + gu_lora + lora("mlp.down_proj"))
            kv_prefix = 2 * (d if d_kv < d else d_kv)     # with a mask, SDPA gets k, v repeated to all heads
            if kind == "prefix" and d_kv < d:
                attn += 2 * (d - d_kv)
        floats += n * rank_total
        floats += n * norm if g(0) else 0
        floats += n * d if qkv_in else 0
        if g(2):
            floats += n * attn
            if kind == "prefix":
                floats += B * P * kv_prefix + B * T * (T + P)
        elif o_lora:
            floats += n * d                                # o_proj's input, not kept by the attention
        floats += n * (d + 2 * m) if kind == "houlsby" else 0
        floats += n * norm if g(5) else 0
        floats += n * d if up_in else 0
        floats += n * mlp if g(7) else 0
        floats += n * f if down_in else 0
        floats += n * (d + 2 * m) if kind == "houlsby" else 0
        floats += n * (d + m) if kind == "pfeiffer" else 0
    if kind == "prefix" and spec.get("projection_dim"):
        floats += P * int(spec["projection_dim"])          # tanh output of the reparameterization
    floats += n * (d + 2 if arch == "gpt2" else d + 1 + (d if full else 0))  # final norm
    floats += n * d if full else 0                         # lm_head input (lm_head trained with the model)
    floats += n * V                                        # logits, kept for the loss
    if arch == "llama":
        floats += 2 * (T + P if kind == "prompt" else T) * hd  # RoPE cos and sin, saved once
    ints = n                                               # targets of the loss
    if full:
        ints += B * T + (T if arch == "gpt2" else 0)       # token ids (embedding grad), position ids (wpe)
    return floats, ints


# Forward order of the linear layers in a block (what rule 2 compares): norm 0, q/k/v 1, attention 2, output
# projection 3, attention adapter 4, second norm 5, MLP input 6, activation 7, MLP output 8, MLP adapter 9.
_GPT2_STAGES = {"attn.c_attn": 1, "attn.c_proj": 3, "mlp.c_fc": 6, "mlp.c_proj": 8}
_LLAMA_STAGES = {"self_attn.q_proj": 1, "self_attn.k_proj": 1, "self_attn.v_proj": 1, "self_attn.o_proj": 3,
                 "mlp.gate_proj": 6, "mlp.up_proj": 6, "mlp.down_proj": 8}
_METHOD_KINDS = ("full", "lora", "pfeiffer", "houlsby", "prefix", "prompt")


def _count_on_meta(model) -> tuple[object, int]:
    return model.config, sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def _meta_size(name: str) -> tuple[object, int]:
    """``(config, parameter count)`` of a named architecture, built once on the meta device."""
    from .models import build_from_config
    return _count_on_meta(build_from_config(name, device="meta"))


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

    ``method`` (notebook 05) makes the estimate exact for a PEFT method: a mapping as in
    :func:`activation_elements` (e.g. ``{"kind": "lora", "rank": 8, "targets": ["c_attn"]}``). Then
    ``trainable_params`` is the method's own parameter count, *added* to N (an adapter's weights exist on
    top of the base), and the activations follow the frozen-base rules of :func:`activation_elements`.
    ``precision="4bit-base"`` (with a method) stores the frozen base in 4 bits, QLoRA's NF4 with double
    quantization: 0.5 B per weight plus 0.127 bits of quantization constants (Dettmers et al. 2023, §3);
    the method trains in bf16-mixed. Embeddings and norms are counted as 4-bit too (QLoRA keeps them in
    16 bits, a few percent of a GPT-2's weights), so this is a lower bound for the parameters.
    """
    from .models import build_from_config

    if precision not in PRECISIONS and precision not in QUANTIZED_BASE:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS) + sorted(QUANTIZED_BASE)}, "
                         f"got {precision!r}")
    peft_method = method is not None and method.get("kind", "full") != "full"
    if peft_method and trainable_params is None:
        raise ValueError("with a PEFT method, trainable_params is the method's own parameter count "
                         "(e.g. from count_parameters after applying it)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    config, total = (_meta_size(name_or_config) if isinstance(name_or_config, str)
                     else _count_on_meta(build_from_config(name_or_config, device="meta")))
    if trainable_params is None:
        trainable_params = total
    if isinstance(trainable_params, bool) or not isinstance(trainable_params, int) \
            or not 0 <= trainable_params <= total:
        raise ValueError(f"trainable_params must be an integer in [0, {total:,}] (the model's size), "
                         f"got {trainable_params!r}")
    if seq_len is None:
        seq_len = getattr(config, "n_positions", None) or config.max_position_embeddings
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
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


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median ignores the odd slow call (another process, a page fault). CUDA work is asynchronous, so
    when CUDA is initialised the device is synchronised before each clock read. Used by the benchmarks of
    every method notebook ("Measure" sections).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (
        lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
