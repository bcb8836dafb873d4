"""Exercises of notebook 00 (why PEFT: the memory arithmetic). Expected answers are computed, not stored.

Each asks for a setting the notebook never prints (another optimizer, another model size, another method's
count), so the answer cannot be read off the screen.
"""
from __future__ import annotations

import math
from functools import lru_cache

from . import as_number, exercise, run_student
from .hinted import hinted, numbers_in, unit_slips

GIB = 2**30
MIB = 2**20

#: bytes of optimizer state per trained parameter, by optimizer (fp32 state in both precisions)
OPTIMIZER_STATE = {"adamw": 8, "sgd_momentum": 4, "sgd": 0}


def _n(name) -> int:
    from ..models import meta_size
    return meta_size(name)[1]


def _optimizer(kind: str, params):
    import torch
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9 if kind == "sgd_momentum" else 0.0)


def _real_state_bytes(optimizer: str = "adamw", freeze_first: bool = True, n_in: int = 64,
                      n_hidden: int = 32) -> tuple[int, int, int]:
    """``(N, N_t, bytes)`` of weights + gradients + optimizer state counted on real fp32 tensors after one step
    of ``optimizer`` on a two-layer network, the first layer frozen when ``freeze_first`` (eq. (1))."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.Linear(n_hidden, 3))
        net[0].requires_grad_(not freeze_first)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = _optimizer(optimizer, trainable)
        net(torch.randn(2, n_in)).sum().backward()
        opt.step()
    size = lambda t: t.numel() * t.element_size()
    total = sum(size(p) for p in net.parameters()) + sum(size(p.grad) for p in trainable)
    total += sum(size(v) for s in opt.state.values() for k, v in s.items()  # "step": one number per tensor
                 if k != "step" and isinstance(v, torch.Tensor))
    return sum(p.numel() for p in net.parameters()), sum(p.numel() for p in trainable), total


@lru_cache(maxsize=None)
def _sgd_momentum_bytes_per_param() -> float:
    n, n_t, total = _real_state_bytes("sgd_momentum", freeze_first=False)
    return total / n


@exercise("00.ex1", "Full fine-tuning in fp32 with SGD with momentum (torch.optim.SGD(params, lr=..., momentum=0.9)) "
                    "instead of AdamW: how many bytes per parameter do the weight, its gradient and the optimizer "
                    "state take together (activations excluded)? Give the total as one number.",
          kind="compute", hidden=lambda: [f"{_sgd_momentum_bytes_per_param():g} bytes per parameter",
                                          f"{_sgd_momentum_bytes_per_param():g} B per parameter",
                                          f"{_sgd_momentum_bytes_per_param():.1f} bytes per parameter"])
def _bytes_per_param(answer):
    expected = _sgd_momentum_bytes_per_param()   # counted on a real SGD step, not stored
    parts = numbers_in(answer)
    if parts is not None:
        if math.isclose(sum(parts), expected):
            return True, (f"your parts add up to {expected:g}: 4 (weight) + 4 (gradient) + 4 (momentum_buffer) "
                          "bytes per parameter — a quarter less than AdamW's 16, which keeps two moments.")
        return False, (f"your parts add up to {sum(parts):g}. List what SGD with momentum keeps per parameter: "
                       "the weight, its gradient, and what in opt.state? (Run one step on a small layer and look.)")
    return hinted(answer, expected, rel_tol=1e-6,
                  mistakes={16: "16 B is AdamW, which keeps two moments (exp_avg, exp_avg_sq); SGD with momentum "
                                "keeps one buffer per parameter.",
                            8: "weight + gradient only: momentum SGD also keeps a momentum buffer of the "
                               "parameter's shape.",
                            4: "that is the weight alone; training adds a gradient and the momentum buffer.",
                            20: "the step counter is not per parameter (and SGD keeps none)."},
                  hint="Count fp32 tensors of the parameter's shape: the weight, its gradient, and each buffer "
                       "in opt.state after one step (SGD with momentum: look for momentum_buffer).",
                  explain=f"4 (weight) + 4 (gradient) + 4 (momentum_buffer) = {expected:g} bytes per parameter: one "
                          "buffer instead of AdamW's two moments.")


#: a GPT-2-style model the notebook never builds: L, d, V, P of eq. (4)
BIG_GPT2 = dict(n_layer=32, n_embd=2560, vocab_size=50257, n_positions=2048)


@lru_cache(maxsize=None)
def _big_gpt2_params() -> int:
    from transformers import GPT2Config
    cfg = GPT2Config(n_head=32, **BIG_GPT2)
    return _n(cfg)


def _big_gpt2_gib() -> float:
    return 16 * _big_gpt2_params() / GIB


@exercise("00.ex2", "A GPT-2-style model with L = 32 blocks, width d = 2560, GPT-2's vocabulary V = 50,257 and "
                    "P = 2048 positions (tied head, as GPT-2): how many GiB (2**30 bytes) do weights, gradients and "
                    "AdamW state take for full fine-tuning in fp32 (activations excluded)? Two decimals "
                    "(±0.5% is accepted).",
          kind="compute", hidden=lambda: [f"{_big_gpt2_gib():.2f}", f"{_big_gpt2_gib():,.1f} GiB"])
def _gpt2_big(answer):
    n = _big_gpt2_params()
    L, d, V, P = (BIG_GPT2[k] for k in ("n_layer", "n_embd", "vocab_size", "n_positions"))
    assert n == 12 * L * d**2 + 13 * L * d + V * d + P * d + 2 * d   # eq. (4) against the meta-device count
    expected = 16 * n / GIB
    return hinted(answer, expected, rel_tol=5e-3, unit=" GiB",
                  mistakes={**unit_slips(expected, "GiB"),
                            12 * n / GIB: "12 bytes per parameter forgets AdamW's second moment.",
                            4 * n / GIB: "that is the weights alone; add gradients and two Adam moments.",
                            8 * n / GIB: "weights + gradients only; AdamW adds two moments.",
                            16 * (n + V * d) / GIB: "the head is tied to the token embedding: count V·d once.",
                            16 * (n - P * d) / GIB: "GPT-2 learns its position embeddings: P·d parameters."},
                  hint="N from eq. (4) with these L, d, V, P; then eq. (2)'s bytes per parameter; 1 GiB = 2**30 B.",
                  explain=f"eq. (4) gives {n:,} parameters; x 16 B = {16 * n:,} B = {expected:.2f} GiB — beyond a 24 "
                          "or 32 GiB "
                          "GPU before a single activation is stored.")


@lru_cache(maxsize=None)
def _lora_qv(name: str, rank: int) -> tuple[int, int]:
    from ..lora import apply_lora
    from ..measure import count_parameters
    from ..models import build_from_config
    t, a = count_parameters(apply_lora(build_from_config(name, device="meta"), rank=rank,
                                       target_modules=["q_proj", "v_proj"]))
    return t, a


def _llama_percent() -> float:
    t, a = _lora_qv("llama-7b", 16)
    return 100 * t / a


@exercise("00.ex3", "LoRA (notebook 02) of rank r = 16 on q_proj and v_proj (each 4096 -> 4096) of every llama-7b "
                    "layer trains two new matrices per projection, one r x 4096 and one 4096 x r, with the base "
                    "frozen. What is PEFT's trainable% (100 x trainable / all, all = base + the new matrices)? "
                    "Four decimals.",
          kind="compute", hidden=lambda: [f"{_llama_percent():.4f}", f"{_llama_percent():.3f}%"])
def _lora_percent(answer):
    t, a = _lora_qv("llama-7b", 16)
    expected = 100 * t / a
    base = a - t
    return hinted(answer, expected, rel_tol=4e-4, unit=" %",
                  mistakes={t / a: "that is a fraction; trainable% is 100 x trainable / all.",
                            100 * t / base: "divide by all parameters, base + LoRA: PEFT counts the adapter's own "
                                            "weights in 'all params'.",
                            100 * (t / 2) / (base + t / 2): "that is half the trainable count: rank 16 on "
                                                             "both q_proj and v_proj (one projection, or rank 8, "
                                                             "gives half)."},
                  hint="Per projection r·(4096 + 4096); two projections in each of llama-7b's 32 layers; the "
                       "base count is printed in section 3.",
                  explain=f"32 layers x 2 projections x 16 x (4096 + 4096) = {t:,} trainable of {a:,}: "
                          f"{expected:.4f}% (Hu et al. 2021 report 10,000x fewer trainable parameters on GPT-3).")


@lru_cache(maxsize=None)
def _activations_mib() -> float:
    from ..estimate import estimate_memory
    return estimate_memory("gpt2", batch_size=8, seq_len=512)["activations"] / MIB


@exercise("00.ex4", "With the activation formula of section 5 (fp32, SDPA attention, GPT-2 block saving "
                    "30d + h + 4 numbers per token per layer, plus 2d + 2 + V per token for the head), how many "
                    "MiB (2**20 bytes) of activations does one gpt2 (small) training step on a batch of 8 x 512 "
                    "tokens keep? ±2% is accepted.",
          kind="compute", hidden=lambda: [f"{_activations_mib():,.0f} MiB", f"{_activations_mib():,.0f}"])
def _activations(answer):
    from ..models import build_from_config
    expected = _activations_mib()
    c = build_from_config("gpt2", device="meta").config
    n, d, h, L, V = 8 * 512, c.n_embd, c.n_head, c.n_layer, c.vocab_size
    return hinted(answer, expected, rel_tol=0.02, unit=" MiB",
                  mistakes={**unit_slips(expected, "MiB"),
                            4 * n * L * (30 * d + h + 4) / MIB: "you left out the head: the logits (V = 50,257 "
                                                                 "per token) are saved for the loss.",
                            4 * n * (30 * d + h + 4 + 2 * d + 2 + V) / MIB: "multiply the per-layer part by "
                                                                             "the 12 layers.",
                            expected / 4: "count 4 bytes per fp32 number."},
                  hint="Eq. (6): tokens B·T = 4096, L = 12, d = 768, h = 12, V = 50,257, 4 bytes per number "
                       "(the int64 ids add only ~0.1 MiB).",
                  explain=f"4 B x {n} tokens x ({L} x {30 * d + h + 4:,} + {2 * d + 2 + V:,}) = {expected:,.0f} MiB: "
                          "at this batch the activations exceed the 1.9 GiB of weights, gradients and Adam state.")


@exercise("00.ex5", "Write model_state_bytes(n_params, n_trainable, precision, optimizer) returning the bytes of "
                    "weights, gradients and optimizer state (eq. (1)) for a model of n_params parameters of which "
                    "n_trainable are trained, precision 'fp32' or 'bf16-mixed' (eq. (2) or (3)), optimizer "
                    "'adamw', 'sgd_momentum' (one fp32 buffer per trained parameter) or 'sgd' (none). Pass the "
                    "function itself to check.",
          kind="build", hidden=lambda: [])
def _model_state_bytes(answer):
    from ..estimate import PRECISIONS, estimate_memory

    n_gpt2, n_llama = _n("gpt2"), _n("llama-7b")
    cases = [("gpt2", n_gpt2, None, "fp32"), ("gpt2", n_gpt2, 294_912, "fp32"),
             ("gpt2", n_gpt2, None, "bf16-mixed"), ("llama-7b", n_llama, n_llama // 100, "bf16-mixed"),
             ("gpt2", n_gpt2, 0, "bf16-mixed")]
    for name, n, n_t, precision in cases:   # AdamW: against the package's estimate
        expected = estimate_memory(name, trainable_params=n_t, batch_size=0, precision=precision)["total"]
        n_t = n if n_t is None else n_t
        got = float(as_number(run_student(answer, n, n_t, precision, "adamw")))
        if not math.isclose(got, expected, rel_tol=1e-9):
            hint = ""
            if math.isclose(got, 16 * n, rel_tol=1e-9) and n_t < n:
                hint = " A frozen parameter has no gradient and no optimizer state: only its weight bytes count."
            elif precision == "bf16-mixed" and n_t and math.isclose(expected - got, 4 * n_t, rel_tol=1e-9):
                hint = " Mixed precision also keeps an fp32 master copy (4 B) per trained parameter."
            return False, (f"with optimizer='adamw', n_params={n:,}, n_trainable={n_t:,}, precision={precision!r} "
                           f"your function gives {got:,.0f}, estimate_memory gives {expected:,} B.{hint}")
    for optimizer in ("sgd_momentum", "sgd", "adamw"):   # every optimizer: against real tensors after one step
        for freeze in (True, False):
            n, n_t, counted = _real_state_bytes(optimizer, freeze_first=freeze)
            got = float(as_number(run_student(answer, n, n_t, "fp32", optimizer)))
            if not math.isclose(got, counted, rel_tol=1e-9):
                return False, (f"on a real two-layer network ({n:,} parameters, {n_t:,} trained, one {optimizer} "
                               f"step in fp32) the tensors hold {counted:,} B; your function gives {got:,.0f}. "
                               "Look at what opt.state holds for that optimizer.")
        b = PRECISIONS["bf16-mixed"]
        n, n_t = 1_000_000, 10_000
        want = b["weight"] * n + (b["master"] + b["grad"] + OPTIMIZER_STATE[optimizer]) * n_t
        got = float(as_number(run_student(answer, n, n_t, "bf16-mixed", optimizer)))
        if not math.isclose(got, want, rel_tol=1e-9):
            return False, (f"bf16-mixed with {optimizer}, n_params={n:,}, n_trainable={n_t:,}: your function gives "
                           f"{got:,.0f}. Mixed precision keeps a bf16 weight for every parameter, and for each "
                           "trained one an fp32 master copy and a bf16 gradient; the optimizer's state is fp32.")
    return True, ("matches estimate_memory for AdamW on 5 configurations and the bytes counted on real tensors after "
                  "one step of AdamW, SGD with momentum and SGD: per trained parameter 16, 12 or 8 B (fp32).")
