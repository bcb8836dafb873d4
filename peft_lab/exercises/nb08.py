"""Exercises of notebook 08 (what matters in practice). Expected answers are computed, not stored: the best rate
from the committed results of ``benchmarks.what_matters`` (read by :mod:`~peft_lab.benchmarks.what_matters_report`),
PiSSA's factors by ``peft_lab.lora.pissa_factors``, LoRA+'s rates by PyTorch's own optimizer and scheduler.
"""
from __future__ import annotations

import math
from functools import lru_cache

from . import as_number, exercise, first_failure, run_student


@lru_cache(maxsize=None)
def _loraplus_rates() -> dict:
    """Plain LoRA r=16's and LoRA+ r=16's best rates (seed 0, interpolated as notebook 08 §4 does), from the
    committed file; LoRA+'s is the rate of its A factors (B's is 16× it)."""
    from ..benchmarks import what_matters_report as report
    res = report.load()
    sw = res["sweeps"]
    if "LoRA r=16" not in sw or "LoRA+ r=16" not in sw:
        return {}                       # a results file that stopped before its family runs
    seed = res["setting"]["seeds"][0]
    return {"lora": report.interpolated_best(report.loss_by_rate(sw["LoRA r=16"], seed=seed)),
            "plus": report.interpolated_best(report.loss_by_rate(sw["LoRA+ r=16"], seed=seed))}


def _forms(x: float) -> list[str]:
    return [f"{x:.2g}", f"{x:.3g}", f"{x:.2e}", f"{x:.1e}"]


@exercise("08.ex1", "Predict: §4 prints plain LoRA r=16's best learning rate (seed 0, interpolated). LoRA+ gives "
                    "every B factor 16× the rate of the A factors. Predict LoRA+ r=16's best rate for A (seed 0, "
                    "interpolated the same way), before section 8's figure — the file holds it, the notebook "
                    "does not print it. Within a factor of 2 counts as right.",
          kind="predict", hidden=lambda: _forms(_loraplus_rates()["plus"]) if _loraplus_rates() else [])
def _predict_rate(answer):
    from numbers import Real
    answer = as_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, Real) or not answer > 0:
        raise TypeError("predict one positive number, a learning rate such as 1e-3")
    b = _loraplus_rates()
    if not b:
        return False, "the results file has no LoRA+ runs yet, so there is nothing to compare with"
    off = answer / b["plus"]
    if 0.5 <= off <= 2:
        return True, (f"LoRA+'s best rate for A is {b['plus']:.2g}, {b['lora'] / b['plus']:.2g}× below plain LoRA's "
                      f"{b['lora']:.2g} (your prediction is {off:.2g}× it). With B 16× faster the product BA moves "
                      "faster at the same base rate, so the best base rate drops — by less than 16×, because A "
                      "still moves at the base rate.")
    if math.isclose(answer, b["lora"], rel_tol=0.3):
        return False, ("that is plain LoRA's own rate: with B now 16× faster, how much faster does the update s·B A "
                       "move at the same base rate, and what does that do to the best base rate?")
    if off < 0.5:
        return False, (f"your prediction is {off:.2g}× the measured rate, too low. Dividing by the full 16 assumes the "
                       "update moves 16× faster; it moves through the product of a fast B and an A that still "
                       "moves at the base rate.")
    return False, (f"your prediction is {off:.2g}× the measured rate, too high: with B 16× faster, the same base "
                   "rate moves the update faster than plain LoRA's, so the best base rate is lower.")


# ----------------------------------------------------------------------------------------------------------
# 08.ex2 (build): PiSSA's initialisation from an SVD
# ----------------------------------------------------------------------------------------------------------

#: (d_out, d_in, rank, scaling): tall, wide and square weights, s = α/r below, at and above 1.
_PISSA_CASES = [(24, 16, 4, 2.0), (16, 40, 3, 1.0), (32, 32, 8, 0.5), (12, 20, 1, 16.0)]


def _pissa_case(fn, case, seed: int) -> str | None:
    import torch

    from ..lora import pissa_factors
    d_out, d_in, r, s = case
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    A_ref, B_ref, res_ref = pissa_factors(W, r, s)
    where = f"for a Conv1D storing a {d_out} × {d_in} map as {d_in} × {d_out}, rank {r}, s = {s:g}"
    out = run_student(fn, W.T.clone(), r, s, forbid=(pissa_factors,))   # GPT-2's Conv1D stores Wᵀ
    if not (isinstance(out, tuple) and len(out) == 3):
        return "return three tensors: (A, B, W_res)"
    A, B, res = (torch.as_tensor(t).detach().to(torch.float32) for t in out)
    if tuple(A.shape) == (r, d_out) and tuple(B.shape) == (d_in, r) and d_in != d_out:
        return (f"A is {tuple(A.shape)} {where}: A multiplies the input x (d_in = {d_in}), so it is r × d_in. You "
                "decomposed the stored matrix as if it were d_out × d_in: transpose it first")
    if tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
        return (f"shapes {tuple(A.shape)}, {tuple(B.shape)} {where}; want A: r × d_in {(r, d_in)}, "
                f"B: d_out × r {(d_out, r)}")
    if tuple(res.shape) != (d_in, d_out):
        return (f"W_res is {tuple(res.shape)} {where}: it goes back into the Conv1D, which stores its weight "
                f"d_in × d_out {(d_in, d_out)} — return it in the layer's layout")
    res = res.T                                                           # compare in the d_out × d_in view
    tol = 1e-4
    if d_in == d_out and torch.allclose(s * B @ A, (s * B_ref @ A_ref).T, atol=tol):
        return (f"s·B A is the transpose of what it should be {where}: you decomposed the stored matrix Wᵀ; "
                "transpose it first, so that A acts on the input")
    tol = 1e-4
    if not torch.allclose(res + s * B @ A, W, atol=tol):
        return (f"W_res + s·B A should give W back exactly {where}: the residual is W − s·B A (08.5), stored "
                "transposed")
    if not torch.allclose(s * B @ A, s * B_ref @ A_ref, atol=tol):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        low = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        if torch.allclose(s * B @ A, low, atol=tol):
            return f"s·B A is built from the r *smallest* singular values {where}; PiSSA takes the largest"
        if torch.allclose(B @ A, s * B_ref @ A_ref, atol=tol):
            return f"B A (without s) is the top-r part {where}: divide the singular values by s, so s·B A is"
        return f"s·B A should be W's best rank-{r} approximation, U_r S_r V_rᵀ (08.4) {where}"
    want = torch.diag(torch.linalg.svdvals(W)[:r] / s)
    if not (torch.allclose(B.T @ B, want, atol=tol) and torch.allclose(A @ A.T, want, atol=tol)):
        return (f"the product is right but the split is not {where}: PiSSA gives B and A each √(S_r / s), so that "
                "BᵀB = A Aᵀ = S_r / s (08.4); both factors then start at the same scale")
    return None


@exercise("08.ex2", "Build PiSSA's initialisation for GPT-2's Conv1D: write pissa_init(W_stored, rank, s), where "
                    "W_stored is a Conv1D weight — the d_out × d_in map W stored transposed, d_in × d_out. Return "
                    "(A, B, W_res) with A: rank × d_in, B: d_out × rank from the top-rank singular triplets of W "
                    "(equation 08.4), and W_res = W − s·B A (08.5) in the layer's stored layout, d_in × d_out. "
                    "check() runs it on four random weights and compares with peft_lab's (which refuses to run "
                    "meanwhile).",
          kind="build", hidden=lambda: [])
def _pissa(answer):
    reason = first_failure(_PISSA_CASES, lambda case, seed: _pissa_case(answer, case, seed), seed=800)
    if reason is not None:
        return False, reason
    return True, (f"on {len(_PISSA_CASES)} weights (tall, wide, square; s from 0.5 to 16) your factors rebuild W, "
                  "their product is W's best rank-r part, each carries √(S_r/s), and the residual goes back in the "
                  "layer's own layout: PEFT's init_lora_weights='pissa' computes the same on a Conv1D.")


# ----------------------------------------------------------------------------------------------------------
# 08.ex3 (debug): a LoRA+ optimizer whose schedule gives B and A the same rate
# ----------------------------------------------------------------------------------------------------------

def _debug_model():
    import torch

    from ..lora import apply_lora
    from ..models import load_base_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base, _ = load_base_model("tiny", device="cpu")
        return apply_lora(base, rank=4, alpha=8, target_modules=["c_attn", "c_fc"])


def _rates(opt, kind: str) -> set[float]:
    ids = {id(p) for n, p in _named if f"lora_{kind}" in n}
    return {g["lr"] for g in opt.param_groups for p in g["params"] if id(p) in ids}


_named: list = []


@exercise("08.ex3", "Debug: loraplus_with_schedule(model, lr, ratio, total_steps) in §8 should give every B "
                    "factor `ratio` times A's learning rate at every step of a one-cycle schedule whose peak for A "
                    "is lr — but B and A end up with the same rate. Fix it and pass the fixed function to check(); "
                    "it steps your scheduler through a run and reads both rates at every step.",
          kind="debug", hidden=lambda: [])
def _loraplus_debug(answer):
    import torch
    model = _debug_model()
    _named[:] = list(model.named_parameters())
    lr, ratio, total = 2e-3, 16.0, 20
    out = run_student(answer, model, lr, ratio, total)
    if not (isinstance(out, tuple) and len(out) == 2):
        return False, "return (optimizer, scheduler), as the notebook's version does"
    opt, sched = out
    if not isinstance(opt, torch.optim.Optimizer):
        return False, f"the first value should be a torch optimizer, got {type(opt).__name__}"
    trainable = [p for _, p in _named if p.requires_grad]
    held = [p for g in opt.param_groups for p in g["params"]]
    if len(held) != len(trainable) or {id(p) for p in held} != {id(p) for p in trainable}:
        return False, "every trainable LoRA factor must sit in exactly one parameter group"
    peak_a, worst = 0.0, None
    for step in range(total):
        a, b = _rates(opt, "A"), _rates(opt, "B")
        if len(a) != 1 or len(b) != 1:
            return False, "all A factors should share one rate, and all B factors another"
        (ra,), (rb,) = a, b
        peak_a = max(peak_a, ra)
        if not math.isclose(rb, ratio * ra, rel_tol=1e-6) and worst is None:
            worst = (step, ra, rb)
        opt.step()
        if sched is not None:
            sched.step()
    if worst is not None:
        step, ra, rb = worst
        same = math.isclose(ra, rb, rel_tol=1e-6)
        return False, (f"at step {step} A's rate is {ra:.3g} and B's {rb:.3g}"
                       + (" — the same: something sets every group's rate after you built the groups. Which "
                          "argument of the scheduler decides each group's peak?" if same else
                          f" — B should have {ratio:g}× A's rate at every step"))
    if sched is None:
        return False, "keep the one-cycle schedule: return the scheduler too"
    if not math.isclose(peak_a, lr, rel_tol=1e-3):
        return False, f"A's peak rate is {peak_a:.3g}; it should be lr = {lr:g} (B's, {ratio:g}× that)"
    return True, (f"B's rate is {ratio:g}× A's at all {total} steps and A peaks at lr: a scheduler that takes one "
                  "max_lr for every group overwrites the groups' own rates — give it one per group.")
