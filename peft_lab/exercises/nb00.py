"""Exercises of notebook 00 (why PEFT: the memory arithmetic). Expected answers are computed, not stored."""
from __future__ import annotations

import math

from . import as_number, exercise, number, run_student

GIB = 2**30
MIB = 2**20


def _n(name: str) -> int:
    from ..measure import count_parameters
    from ..models import build_from_config
    return count_parameters(build_from_config(name, device="meta"))[1]


@exercise("00.ex1", "Full fine-tuning with fp32 AdamW: how many bytes does each parameter need for its weight, "
                  "gradient and optimizer state together (activations excluded)?")
def _bytes_per_param(answer):
    from ..estimate import PRECISIONS
    b = PRECISIONS["fp32"]
    expected = b["weight"] + b["grad"] + b["adam"]
    return number(answer, expected, rel_tol=1e-6,
                  mistakes={12: "you kept one Adam moment; AdamW keeps two per parameter (exp_avg and "
                                "exp_avg_sq), 4 B each.",
                            8: "weights + gradients only; AdamW adds two moments (8 B).",
                            4: "that is the weight alone; training adds a gradient (4 B) and two moments (8 B).",
                            20: "the scalar step counter is one number per tensor, not per parameter."},
                  explain="4 (weight) + 4 (gradient) + 4 (exp_avg) + 4 (exp_avg_sq) = 16 bytes per parameter.")


@exercise("00.ex2", "How many GiB (2**30 bytes) do weights, gradients and AdamW state take for full fine-tuning of "
                  "gpt2-xl in fp32 (activations excluded)?")
def _gpt2_xl(answer):
    n = _n("gpt2-xl")
    expected = 16 * n / GIB
    return number(answer, expected, rel_tol=5e-3, unit=" GiB",
                  mistakes={16 * n / 1e9: "that is in GB (10**9 bytes); the question asks for GiB (2**30).",
                            12 * n / GIB: "12 bytes per parameter forgets AdamW's second moment.",
                            4 * n / GIB: "that is the weights alone; add gradients and two Adam moments.",
                            8 * n / GIB: "weights + gradients only; AdamW adds two moments."},
                  explain=f"16 B x {n:,} parameters = {16 * n:,} B = {expected:.2f} GiB — more than a 16 GiB "
                          "GPU before a single activation is stored.")


def _lora_c_attn(name: str, rank: int) -> tuple[int, int]:
    from ..models import build_from_config
    c = build_from_config(name, device="meta").config
    trainable = c.n_layer * rank * (c.n_embd + 3 * c.n_embd)  # A: d -> r, B: r -> 3d, in every layer
    return trainable, _n(name) + trainable


@exercise("00.ex3", "LoRA of rank r=8 on the c_attn projection (d -> 3d) of every gpt2-xl layer trains two "
                    "new matrices per layer, one r x d and one 3d x r (notebook 02 derives them). What is PEFT's "
                    "trainable% (100 x trainable / all, where all = base + LoRA)? Give four decimals.")
def _lora_percent(answer):
    t, a = _lora_c_attn("gpt2-xl", 8)
    expected = 100 * t / a
    from ..models import build_from_config
    c = build_from_config("gpt2-xl", device="meta").config
    square = c.n_layer * 8 * 2 * c.n_embd
    return number(answer, expected, rel_tol=4e-4, unit=" %",
                  mistakes={t / a: "that is a fraction; trainable% is 100 x trainable / all.",
                            100 * t / (a - t): "divide by all parameters, base + LoRA: PEFT counts the "
                                               "adapter's own weights in 'all params'.",
                            100 * square / (a - t + square): "c_attn maps d -> 3d, so the second matrix is "
                                                                            "3d x r, not d x r."},
                  explain=f"{c.n_layer} layers x 8 x (1600 + 4800) = {t:,} trainable of {a:,}: "
                          f"{expected:.4f}% (Hu et al. 2021 report 10,000x fewer trainable parameters on GPT-3).")


@exercise("00.ex4", "With the activation formula of section 5 (fp32, SDPA attention, GPT-2 block saving "
                  "30d + h + 4 numbers per token per layer, plus 2d + 2 + V per token for the head), how many "
                  "MiB of activations does one gpt2 (small) training step on a batch of 8 x 512 tokens keep?")
def _activations(answer):
    from ..estimate import estimate_memory
    expected = estimate_memory("gpt2", batch_size=8, seq_len=512)["activations"] / MIB
    from ..models import build_from_config
    c = build_from_config("gpt2", device="meta").config
    n, d, h, L, V = 8 * 512, c.n_embd, c.n_head, c.n_layer, c.vocab_size
    return number(answer, expected, rel_tol=0.02, unit=" MiB",
                  mistakes={4 * n * L * (30 * d + h + 4) / MIB: "you left out the head: the logits (V = 50,257 "
                                                                 "per token) are saved for the loss.",
                            4 * n * (30 * d + h + 4 + 2 * d + 2 + V) / MIB: "multiply the per-layer part by "
                                                                             "the 12 layers.",
                            expected * 2**20 / 1e6: "that is in MB (10**6 bytes); the question asks for MiB.",
                            expected / 4: "count 4 bytes per fp32 number."},
                  explain=f"4 B x {n} tokens x ({L} x {30 * d + h + 4:,} + {2 * d + 2 + V:,}) = {expected:,.0f} MiB: "
                          "at this batch "
                          "the activations exceed the 1.9 GiB of weights, gradients and Adam state.")


def _real_state_bytes(n_in: int = 64, n_hidden: int = 32) -> tuple[int, int, int]:
    """``(N, N_t, bytes)`` of weights + gradients + AdamW moments counted on real tensors after one fp32 step,
    with the first of two linear layers frozen (the "frozen base" case of eq. (1))."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.Linear(n_hidden, 3))
    net[0].requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    net(torch.randn(2, n_in)).sum().backward()
    opt.step()
    size = lambda t: t.numel() * t.element_size()
    total = sum(size(p) for p in net.parameters()) + sum(size(p.grad) for p in trainable)
    total += sum(size(v) for s in opt.state.values() for k, v in s.items() if k != "step")  # step: 1 per tensor
    return sum(p.numel() for p in net.parameters()), sum(p.numel() for p in trainable), total


@exercise("00.ex5", "Write model_state_bytes(n_params, n_trainable, precision) returning the bytes of weights, "
                    "gradients and AdamW state (eq. (1) with the bytes of eq. (2) or (3)) for a model of n_params "
                    "parameters of which n_trainable are trained, precision 'fp32' or 'bf16-mixed'. Pass the "
                    "function itself to check.")
def _model_state_bytes(answer):
    from ..estimate import estimate_memory

    if not callable(answer):
        raise TypeError("pass your function itself, e.g. check('00.ex5', model_state_bytes)")
    n_gpt2, n_llama = _n("gpt2"), _n("llama-7b")
    cases = [("gpt2", n_gpt2, None, "fp32"), ("gpt2", n_gpt2, 294_912, "fp32"),
             ("gpt2", n_gpt2, None, "bf16-mixed"), ("llama-7b", n_llama, n_llama // 100, "bf16-mixed"),
             ("gpt2", n_gpt2, 0, "bf16-mixed")]
    for name, n, n_t, precision in cases:
        expected = estimate_memory(name, trainable_params=n_t, batch_size=0, precision=precision)["total"]
        n_t = n if n_t is None else n_t
        got = run_student(answer, n, n_t, precision)
        if not math.isclose(float(as_number(got)), expected, rel_tol=1e-9):
            hint = ""
            if math.isclose(float(as_number(got)), 16 * n, rel_tol=1e-9) and n_t < n:
                hint = " A frozen parameter has no gradient and no optimizer state: only its weight bytes count."
            elif precision == "bf16-mixed" and math.isclose(float(as_number(got)), 2 * n + 4 * n_t, rel_tol=1e-9):
                hint = " Mixed precision still keeps fp32 Adam moments and an fp32 master copy per trained parameter."
            return False, (f"for n_params={n:,}, n_trainable={n_t:,}, precision={precision!r} your function gives "
                           f"{got:,}, estimate_memory gives {expected:,} B.{hint}")
    n, n_t, counted = _real_state_bytes()
    got = run_student(answer, n, n_t, "fp32")
    if not math.isclose(float(as_number(got)), counted, rel_tol=1e-9):
        return False, (f"on a real two-layer network ({n:,} parameters, {n_t:,} trained, one AdamW step) the "
                       f"tensors hold {counted:,} B; your function gives {got:,}.")
    return True, (f"matches estimate_memory on {len(cases)} configurations and the {counted:,} B counted on the "
                  "tensors of a real AdamW step: 4 B (fp32) or 2 B (bf16) per frozen weight, 16 B per trained one.")
