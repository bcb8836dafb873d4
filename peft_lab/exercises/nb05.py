"""Exercises of notebook 05 (beyond LoRA: IA3, DoRA, QLoRA). Expected answers are computed by the package from
the notebook's equations, not stored; code answers are run on cases the notebook never shows.

* 05.ex1 (predict, §3): how many times smaller gpt2-small's frozen base gets as a QLoRA base (05.Q4, 05.Q5).
* 05.ex2 (build, §5): DoRA's weight-decomposition measures ΔM and ΔD, in either weight layout.
* 05.ex3 (debug): a deployment that merges a QLoRA adapter and quantizes the result again.
* 05.ex4 (compute): NF4's stored bits per weight for another block size (05.Q4).
"""
from __future__ import annotations

import copy
import math
from numbers import Real

from . import as_number, exercise, first_failure, run_student


def _numeric(answer, expected: float, *, abs_tol: float, mistakes: dict[float, str], hint: str,
             right: str, mistake_tol: float | None = None) -> tuple[bool, str]:
    """Right within ``abs_tol``; a known mistake named; otherwise too high/low and a hint — never the answer."""
    answer = as_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, Real):
        raise TypeError(f"expected one number, got {type(answer).__name__}")
    answer = float(answer)
    if abs(answer - expected) <= abs_tol:
        return True, right
    for value, reason in mistakes.items():
        if abs(answer - value) <= (abs_tol if mistake_tol is None else mistake_tol):
            return False, reason
    return False, f"{answer:g} is too {'high' if answer > expected else 'low'}. {hint}"


# ---------------------------------------------------------------------------------------------------------------
# 05.ex1 (predict): gpt2-small's frozen base as QLoRA stores it, against fp32
# ---------------------------------------------------------------------------------------------------------------

def qlora_base_ratio(size: str = "gpt2") -> tuple[float, float]:
    """``(fp32 bytes / QLoRA-base bytes, share of parameters in NF4 layers)`` for architecture ``size``: the
    weights of every linear layer but the output head at :func:`~peft_lab.qlora.nf4_bits_per_parameter` bits
    (05.Q4), everything else (embeddings, positions, norms, biases) at 2 bytes (bf16), as §3 counts them."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from ..models import build_from_config
    from ..qlora import nf4_bits_per_parameter
    meta = build_from_config(size, device="meta")
    head = meta.get_output_embeddings()
    n = sum(p.numel() for p in meta.parameters())
    n4 = sum(m.weight.numel() for m in meta.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head)
    stored = n4 * nf4_bits_per_parameter() / 8 + 2 * (n - n4)
    return 4 * n / stored, n4 / n


@exercise("05.ex1", "Predict, before §3's gpt2-small cell runs: how many times smaller is gpt2-small's frozen base "
                    "stored as QLoRA stores it (linear layers in NF4 at 4.127 bits, the rest in bf16) than in "
                    "fp32? One number; a prediction within ±10% counts.",
          kind="predict", hidden=lambda: [])
def _predict_ratio(answer):
    ratio, share = qlora_base_ratio("gpt2")
    answer = as_number(answer)
    if isinstance(answer, Real) and not isinstance(answer, bool) and float(answer) < 1:
        return False, ("that reads as bytes after / bytes before; the question asks how many times *smaller*, "
                       "a number above 1.")
    ok, why = _numeric(answer, ratio, abs_tol=0.10 * ratio, mistakes={
        32 / 4.127: "32/4.127 ≈ 7.75 is the ratio if *every* weight were in NF4. Which of gpt2-small's weights does "
                    "quantize_model leave in float, and how large a share of the model are they (§3, the tiny "
                    "model's line gives the idea)?",
        8.0: "8 = 32/4 counts the 4-bit indices alone, and every weight as if it were in NF4.",
        2.0: "2 is fp32 → bf16 for everything; the linear layers go to about 4 bits."},
        hint="Count the share of parameters that stay in 16 bits (embeddings are large at this size), then "
             "weigh 32 bits against 4.127 bits for the rest.",
        right="", mistake_tol=0.12)
    if ok:
        why = (f"the calculation gives {ratio:.2f}x: {share:.0%} of the parameters are in NF4 layers, the other "
               f"{1 - share:.0%} (token and position embeddings, norms, biases) cost 16 bits each, so the whole "
               f"base shrinks much less than 32/4.127. The next cell measures the stored tensors; compare.")
    return ok, why


# ---------------------------------------------------------------------------------------------------------------
# 05.ex2 (build): ΔM and ΔD of DoRA's weight-decomposition analysis
# ---------------------------------------------------------------------------------------------------------------

def _dmdd_reason(fn, case, seed: int) -> str | None:
    import torch

    from ..lora import magnitude_direction_change
    d_out, d_in, fan_in_fan_out, kind = case
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g)
    if kind == "scaled":                              # rows rescaled only: ΔD must be 0
        w = w0 * (1 + 0.3 * torch.rand(d_out, 1, generator=g))
    elif kind == "shrunk":                            # every row shorter: a signed ΔM would be negative
        w = 0.7 * w0 + 0.05 * torch.randn(d_out, d_in, generator=g)
    else:
        w = w0 + 0.3 * torch.randn(d_out, d_in, generator=g)
    if fan_in_fan_out:                                # Conv1D stores d_in × d_out
        w0, w = w0.T.contiguous(), w.T.contiguous()
    expected = magnitude_direction_change(w0, w, fan_in_fan_out=fan_in_fan_out)
    got = run_student(fn, w0.clone(), w.clone(), fan_in_fan_out=fan_in_fan_out, forbid=(magnitude_direction_change,))
    try:
        got = tuple(float(as_number(v)) for v in got)
    except (TypeError, ValueError):
        return f"return two numbers (ΔM, ΔD), got {got!r}"
    if len(got) != 2:
        return f"return two numbers (ΔM, ΔD), got {len(got)}"
    where = f"on a {'Conv1D' if fan_in_fan_out else 'nn.Linear'}-layout weight {tuple(w0.shape)}"
    if all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7) for a, b in zip(got, expected)):
        return None
    flipped = magnitude_direction_change(w0, w, fan_in_fan_out=not fan_in_fan_out) if d_out != d_in else None
    if flipped and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7) for a, b in zip(got, flipped)):
        return (f"{where} you took norms over the wrong dimension: one norm per *output feature*, over its d_in "
                f"inputs (Conv1D stores the weight transposed: fan_in_fan_out=True)")
    if math.isclose(got[1], 1 - expected[1], rel_tol=1e-4, abs_tol=1e-6) or (kind == "scaled" and got[1] > 0.5):
        return f"{where} ΔD is wrong: it is the mean of 1 − cos, which is 0 when only lengths change"
    a, b = (w0.T, w.T) if fan_in_fan_out else (w0, w)
    signed = (b.double().norm(dim=1) - a.double().norm(dim=1)).mean().item()
    if math.isclose(got[0], signed, rel_tol=1e-4, abs_tol=1e-7) or got[0] < 0:
        return f"{where} ΔM is a signed mean: it is the mean of |‖w_i‖ − ‖w0_i‖|, an absolute change per row"
    return f"{where} your (ΔM, ΔD) = ({got[0]:.4g}, {got[1]:.4g}) differ from the definition in §5"


@exercise("05.ex2", "Write delta_m_delta_d(w0, w, fan_in_fan_out=False) -> (ΔM, ΔD) of §5 for one weight: per output "
                    "feature i, ΔM = mean |‖w_i‖ − ‖w0_i‖| and ΔD = mean (1 − cos(w_i, w0_i)); fan_in_fan_out=True "
                    "means Conv1D's d_in × d_out layout. Pass the function.",
          kind="build", hidden=lambda: [])
def _build_dmdd(fn):
    cases = [(6, 10, False, "random"), (10, 6, True, "random"), (7, 12, False, "scaled"), (12, 7, True, "shrunk"),
             (5, 9, False, "shrunk")]
    reason = first_failure(cases, lambda case, seed: _dmdd_reason(fn, case, seed), seed=50)
    if reason:
        return False, reason
    return True, ("your measures equal peft_lab's magnitude_direction_change on five weights in both layouts "
                  "(rows rescaled only give ΔD = 0; shrinking rows count as a positive ΔM).")


# ---------------------------------------------------------------------------------------------------------------
# 05.ex3 (debug): merging a QLoRA adapter, then quantizing again
# ---------------------------------------------------------------------------------------------------------------

BUGGY_DEPLOY = '''def deploy(qlora_model):
    """The trained QLoRA model, ready to serve: adapter merged (no extra compute per layer), base in 4 bits."""
    model = peft_lab.dequantize_model(copy.deepcopy(qlora_model))   # float layers holding the NF4 rounding Ŵ0
    model = peft_lab.remove_lora(model, merge=True)                  # W <- Ŵ0 + s·BA, plain layers again
    return qlora.quantize_model(model)                               # back to 4 bits, to keep the memory saving
'''


def _trained_qlora(seed: int):
    """A tiny QLoRA model with a non-zero update (B random, as after training) and probe ids."""
    import torch

    from ..lora import apply_lora, lora_layers
    from ..models import load_base_model
    from ..qlora import quantize_model
    base, _ = load_base_model("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = apply_lora(quantize_model(copy.deepcopy(base)), rank=4, alpha=8)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, ids


@exercise("05.ex3", "Debug: deploy(qlora_model) (the snippet in the notebook) should return a model that gives the "
                    "trained QLoRA model's outputs with no LoRA branch left to compute; it does not. Fix it and pass "
                    "your deploy function. (The returned base need not stay in 4 bits: one of 'no branch' and "
                    "'4 bits' has to go, and the check's reply says which and why.)",
          kind="debug", hidden=lambda: [])
def _debug_deploy(fn):
    import torch

    from ..lora import LoRALinear
    from ..qlora import nf4_layers
    model, ids = _trained_qlora(seed=7)
    with torch.no_grad():
        want = model(ids).logits
        served = run_student(fn, model)
        if served is model:
            served = model
        got = served(ids).logits
    unmerged = [m for m in served.modules() if isinstance(m, LoRALinear) and not m.merged]
    diff = (got - want).abs().max().item()
    if unmerged:
        return False, (f"{len(unmerged)} LoRA layers still compute their branch in every forward pass. Merge the "
                       f"update into float weights (the NF4 weight cannot take it: see §3).")
    if diff > 1e-4:
        again = len(list(nf4_layers(served)))
        why = (f"the outputs moved by up to {diff:.2f} from the trained model's. "
               + (f"{again} layers are in NF4 again: quantizing Ŵ0 + s·BA rounds every weight once more to one of "
                  f"16 levels per block, the merged update with it, so the outputs change."
                  if again else "Merge exactly the update that was trained (scaling included) into Ŵ0."))
        return False, why
    return True, ("outputs equal the trained model's within float reordering (max |Δ| ≤ 1e-4) and no "
                  "LoRA branch is left. The price: the merged base is in float (16/32 bits), not 4 — or keep the "
                  "4-bit base and serve the adapter unmerged. A merged QLoRA model cannot stay in 4 bits without "
                  "changing its outputs.")


# ---------------------------------------------------------------------------------------------------------------
# 05.ex4 (compute): bits per weight for blocks of 128
# ---------------------------------------------------------------------------------------------------------------

@exercise("05.ex4", "NF4 with double quantization and blocks of 128 weights (the absmax constants still in blocks of "
                    "256): how many bits per weight are stored (05.Q4)? Give four decimals (±0.0001).",
          kind="compute",
          hidden=lambda: [f"{__import__('peft_lab').qlora.nf4_bits_per_parameter(128, True):.4f}"])
def _bits(answer):
    from ..qlora import nf4_bits_per_parameter
    expected = nf4_bits_per_parameter(block_size=128, double_quant=True)
    answer_num = as_number(answer)
    if isinstance(answer_num, Real) and not isinstance(answer_num, bool) and abs(answer_num - expected) > 1e-4 \
            and round(float(answer_num), 3) == round(expected, 3):
        return False, ("right to three decimals, but the question asks for four: the second level of double "
                       "quantization adds less than 0.001 bit, and four decimals are needed to see it.")
    return _numeric(answer, expected, abs_tol=1e-4, mistakes={
        nf4_bits_per_parameter(64, True): "that is for blocks of 64; the question uses 128.",
        nf4_bits_per_parameter(128, False): "that is without double quantization: an fp32 absmax per 128 weights.",
        4 + 8 / 128: "add the second level: one fp32 constant per 256 of the 8-bit absmax values.",
        4.0: "the 4-bit indices alone; the absmax constants cost bits too.",
        4 + 8 / 64 + 32 / 128: "each weight carries an 8-bit absmax share per block, not a 32-bit one too."},
        hint="Per weight: 4 bits of index, plus one 8-bit absmax per block of 128, plus one fp32 constant per "
             "256 of those absmax values (05.Q4).",
        right=f"{expected:.4f} bits: blocks twice as long (128 weights instead of 64) halve the absmax cost, "
              f"from 0.127 to about 0.063 bit per weight.")
