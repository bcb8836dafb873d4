"""Exercises of notebook 00 (why PEFT: the memory arithmetic). Expected answers are computed, not stored."""
from __future__ import annotations

from . import exercise, number

GIB = 2**30
MIB = 2**20


def _n(name: str) -> int:
    from ..measure import count_parameters
    from ..models import build_from_config
    return count_parameters(build_from_config(name, device="meta"))[1]


@exercise("00.1", "Full fine-tuning with fp32 AdamW: how many bytes does each parameter need for its weight, "
                  "gradient and optimizer state together (activations excluded)?")
def _bytes_per_param(answer):
    from ..measure import PRECISIONS
    b = PRECISIONS["fp32"]
    expected = b["weight"] + b["grad"] + b["adam"]
    return number(answer, expected, rel_tol=1e-6,
                  mistakes={12: "you kept one Adam moment; AdamW keeps two per parameter (exp_avg and "
                                "exp_avg_sq), 4 B each.",
                            8: "weights + gradients only; AdamW adds two moments (8 B).",
                            4: "that is the weight alone; training adds a gradient (4 B) and two moments (8 B).",
                            20: "the scalar step counter is one number per tensor, not per parameter."},
                  explain="4 (weight) + 4 (gradient) + 4 (exp_avg) + 4 (exp_avg_sq) = 16 bytes per parameter.")


@exercise("00.2", "How many GiB (2**30 bytes) do weights, gradients and AdamW state take for full fine-tuning of "
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


@exercise("00.3", "LoRA of rank r=8 on the c_attn projection (d -> 3d) of every gpt2-xl layer adds A (r x d) "
                  "and B (3d x r). What is PEFT's trainable% (100 x trainable / all, where all = base + LoRA)? "
                  "Give four decimals.")
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
                            100 * square / (a - t + square): "c_attn maps d -> 3d, so B is 3d x r, not d x r."},
                  explain=f"{c.n_layer} layers x 8 x (1600 + 4800) = {t:,} trainable of {a:,}: "
                          f"{expected:.4f}% (Hu et al. 2021 report 10,000x fewer trainable parameters on GPT-3).")


@exercise("00.4", "With the activation formula of section 5 (fp32, SDPA attention, GPT-2 block saving "
                  "30d + h + 4 numbers per token per layer, plus 2d + 2 + V per token for the head), how many "
                  "MiB of activations does one gpt2 (small) training step on a batch of 8 x 512 tokens keep?")
def _activations(answer):
    from ..measure import estimate_memory
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
