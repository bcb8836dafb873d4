"""Exercises of notebook 02 (LoRA). Expected answers are computed from the notebook's equations, not stored.

Ids are ``"02.exN"`` so that they cannot be mistaken for the notebook's equation tags ``(02.N)``.
"""
from __future__ import annotations

import copy
import math

from . import exercise, first_failure, number


def _lora_params(rank: int, d_in: int, d_out: int) -> int:
    """Equation (02.5): A is r × d_in, B is d_out × r."""
    return rank * (d_in + d_out)


@exercise("02.ex1", "LLaMA-2 7B's q_proj maps 4096 features to 4096. How many trainable parameters does LoRA of "
                    "rank r=16 add to ONE q_proj layer (A and B together)?")
def _params(answer):
    r, d_in, d_out = 16, 4096, 4096
    expected = _lora_params(r, d_in, d_out)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={d_in * d_out: "that is the full weight W (d_out × d_in); LoRA trains A and B only.",
                            r * d_in: "that is A alone (r × d_in); add B (d_out × r).",
                            r * d_in * d_out: "LoRA does not multiply the dimensions: A has r·d_in entries, "
                                              "B has d_out·r.",
                            _lora_params(8, d_in, d_out): "that is rank 8; the question uses r = 16.",
                            32 * 2 * _lora_params(r, d_in, d_out): "that is the whole model (32 layers, q and "
                                                                   "v); the question asks for one layer."},
                  explain=f"r (d_in + d_out) = 16 × (4096 + 4096) = {expected:,} — 0.8% of the "
                          f"{d_in * d_out:,} entries of W (equation 02.5).")


@exercise("02.ex2", "With lora_alpha = 32 and rank r = 8 (plain LoRA), what is the scaling s in h = Wx + s·BAx?")
def _scaling(answer):
    from ..lora import lora_scaling
    expected = lora_scaling(8, 32)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={8 / 32: "upside down: s = α / r, not r / α.",
                            32 / 8 ** 0.5: "that is the rsLoRA scaling α/√r; plain LoRA divides by r.",
                            32: "α is not used as is; it is divided by the rank."},
                  explain="s = α / r = 32 / 8 = 4 (equation 02.2).")


@exercise("02.ex3", "rsLoRA with lora_alpha = 16 and rank r = 64: what is the scaling s? "
                    "(Then compare it with plain LoRA's α/r at the same settings.)")
def _rslora(answer):
    from ..lora import lora_scaling
    expected = lora_scaling(64, 16, use_rslora=True)
    plain = lora_scaling(64, 16)
    return number(answer, expected, rel_tol=1e-9,
                  mistakes={plain: "that is plain LoRA's α/r; rsLoRA divides by √r.",
                            64 ** 0.5 / 16: "upside down: s = α / √r, not √r / α.",
                            16: "α is not used as is; it is divided by √r."},
                  explain=f"s = α / √r = 16 / 8 = {expected:g} (equation 02.6), eight times plain LoRA's "
                          f"α/r = {plain:g}. Section 2.6 measures what each choice does to the size of an update.")


@exercise("02.ex4", "A LoRA layer with d_in = d_out = 768 and r = 8 has been merged (W ← W + s·BA). How many "
                    "EXTRA multiply-adds per token does it cost at inference, compared with the base layer?")
def _merged_flops(answer):
    r, d = 8, 768
    unmerged = _lora_params(r, d, d)
    return number(answer, 0, rel_tol=1e-9,
                  mistakes={unmerged: f"{unmerged:,} = r(d_in + d_out) is the cost of the UNMERGED branch "
                                      "B(Ax); after merging, W already contains s·BA.",
                            2 * unmerged: "that counts the unmerged branch in FLOPs (2 per multiply-add); "
                                          "after merging there is no branch at all.",
                            d * d: "the merged W has the same shape as before: the base layer's own "
                                   "d_in·d_out multiply-adds are not extra."},
                  explain="0: the merged weight has the same shape as W (equation 02.7), so the layer costs "
                          "exactly the base layer's d_in·d_out multiply-adds — why LoRA adds no inference "
                          "latency (Hu et al. 2021, Table 1).")


# ----------------------------------------------------------------------------------------------------------
# 02.ex5: the student's own LoRA layer, graded by running it against peft_lab.LoRALinear
# ----------------------------------------------------------------------------------------------------------

#: (d_in, d_out, rank, alpha, use_rslora, input shape) — several shapes, both scalings, 2-D and 3-D inputs.
_LAYER_CASES = [
    (16, 24, 4, 8.0, False, (5, 16)),
    (32, 8, 1, 2.0, True, (2, 3, 32)),
    (7, 13, 3, 5.0, False, (4, 7)),
    (64, 64, 16, 8.0, True, (2, 5, 64)),
]


def _case_name(case) -> str:
    d_in, d_out, r, alpha, rs, shape = case
    return (f"nn.Linear({d_in}, {d_out}), rank={r}, alpha={alpha:g}, use_rslora={rs}, "
            f"input of shape {tuple(shape)}")


def _check_layer_case(cls, case, seed: int) -> str | None:
    """Run the student's class on one case; return None if it behaves like LoRALinear, else the reason."""
    import torch
    from torch import nn

    from ..lora import LoRALinear, lora_scaling

    d_in, d_out, r, alpha, rs, shape = case
    where = f"with {_case_name(case)}"
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    w0 = base.weight.detach().clone()
    x = torch.randn(shape)
    try:
        layer = cls(copy.deepcopy(base), r, alpha, use_rslora=rs)
    except Exception as err:  # the student's code: report any failure as a reason
        return f"MyLoRA(base, {r}, {alpha:g}, use_rslora={rs}) raised {type(err).__name__}: {err}"
    params = dict(layer.named_parameters())
    for name, want in (("A", (r, d_in)), ("B", (d_out, r))):
        if not isinstance(params.get(name), nn.Parameter):
            return (f"the layer needs an nn.Parameter called {name} of shape {want} (self.{name} = "
                    f"nn.Parameter(...)); found parameters {sorted(params)}")
        if tuple(params[name].shape) != want:
            return (f"{name} has shape {tuple(params[name].shape)} {where}; equation (02.1) wants {want} "
                    f"({'r × d_in' if name == 'A' else 'd_out × r'})")
    A, B = params["A"], params["B"]
    if not (A.requires_grad and B.requires_grad):
        return "A and B must be trainable (requires_grad=True)"
    others = [n for n, p in params.items() if n not in ("A", "B") and p.requires_grad]
    if others:
        return f"the base layer must be frozen (requires_grad=False), but {others} still train"
    bases = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    if len(bases) != 1 or not torch.equal(bases[0].weight.detach(), w0):
        return "the layer should keep the nn.Linear it was given (unchanged) as its frozen base"
    if not bool((B.detach() == 0).all()):
        return "B must start at zero, so that ΔW = BA = 0 at step 0 (equation 02.3)"
    bound = 1 / math.sqrt(d_in)
    if bool((A.detach() == 0).all()) or float(A.detach().abs().max()) > bound + 1e-6:
        return (f"A should be drawn like an ordinary linear layer, kaiming_uniform_(a=√5): non-zero and within "
                f"±1/√d_in = ±{bound:.3f} (equation 02.3); a zero A would leave B without gradient")
    # Uniform on ±1/√d_in has standard deviation 1/√(3·d_in). The smallest case has 21 entries, whose sample std
    # sits within ±10% of that (1 s.e.); half of it can only mean a constant or squeezed A, whose rows start
    # (nearly) alike, so the r directions of A would not be independent.
    spread, want = float(A.detach().std()), bound / math.sqrt(3)
    if spread < 0.5 * want:
        return (f"A's entries should be spread over ±1/√d_in like a fresh nn.Linear's weight (kaiming_uniform_(a=√5), "
                f"standard deviation 1/√(3·d_in) = {want:.3f}); yours have standard deviation {spread:.3g} {where} "
                "(equation 02.3)")
    try:
        with torch.no_grad():
            same = torch.allclose(layer(x), base(x), atol=1e-6)
    except Exception as err:
        return f"calling the layer {where} raised {type(err).__name__}: {err}"
    if not same:
        return f"at initialisation the output must equal base(x) exactly (B = 0), but it differs {where}"

    # Give A and B random values, the same in the student's layer and in peft_lab's LoRALinear.
    ref = LoRALinear(copy.deepcopy(base), rank=r, alpha=alpha, use_rslora=rs)
    with torch.no_grad():
        A.copy_(torch.randn(r, d_in) * 0.3)
        B.copy_(torch.randn(d_out, r) * 0.3)
        ref.lora_A.weight.copy_(A)
        ref.lora_B.weight.copy_(B)
    try:
        out = layer(x)
    except Exception as err:
        return f"calling the layer {where} raised {type(err).__name__}: {err}"
    expected = ref(x)
    if out.shape != expected.shape:
        return f"the output has shape {tuple(out.shape)}, expected {tuple(expected.shape)} {where}"
    tol = 1e-5 * (1 + float(expected.detach().abs().max()))
    if float((out - expected).detach().abs().max()) > tol:
        branch = (x @ A.T @ B.T).detach()
        s_right = lora_scaling(r, alpha, rs)
        guesses = [(alpha / r, "α/r"), (alpha / math.sqrt(r), "α/√r"), (1.0, "no scaling (s = 1)"), (alpha, "α itself")]
        for s, label in guesses:
            if not math.isclose(s, s_right) and torch.allclose(out.detach(), base(x).detach() + s * branch, atol=tol):
                want = "α/√r (use_rslora=True)" if rs else "α/r"
                return f"the branch is scaled by {label} {where}; equation (02.6) asks for s = {want} = {s_right:g}"
        worst = float((out - expected).detach().abs().max())
        return f"the output differs from base(x) + s·B(Ax) {where} (max |Δ| = {worst:.2e})"
    g = torch.randn(expected.shape)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    for name, mine, theirs in (("A", A, ref.lora_A.weight), ("B", B, ref.lora_B.weight)):
        if mine.grad is None:
            return f"no gradient reached {name}: use the parameter itself in forward (not .data or .detach())"
        if not torch.allclose(mine.grad, theirs.grad, atol=1e-4 * (1 + float(theirs.grad.detach().abs().max()))):
            return f"the gradient of {name} differs from LoRALinear's {where} (equation 02.4)"

    if not callable(getattr(layer, "merge", None)):
        return "the layer needs a merge() method that folds s·BA into the base weight (equation 02.7)"
    try:
        with torch.no_grad():
            layer.merge()
            merged_out = layer(x)
    except Exception as err:
        return f"merge() or the call after it raised {type(err).__name__}: {err}"
    s_right = lora_scaling(r, alpha, rs)
    w_expected = w0 + s_right * B.detach() @ A.detach()
    if not torch.allclose(bases[0].weight.detach(), w_expected, atol=1e-5):
        return "after merge() the base weight should be W0 + s·BA (equation 02.7), in place"
    if not torch.allclose(merged_out, expected.detach(), atol=tol):
        return ("after merge() the output changed: once s·BA is inside W, forward must not add the branch again "
                "(keep a flag such as self.merged)")
    return None


@exercise("02.ex5", "Write your own LoRA layer: class MyLoRA(nn.Module) with __init__(self, base, rank, alpha, "
                    "use_rslora=False) wrapping a frozen nn.Linear, trainable nn.Parameters A (rank × in) and "
                    "B (out × rank) initialised as in equation (02.3), forward(x) = base(x) + s·B(Ax) with s from "
                    "(02.6), and merge() that folds s·BA into the base weight in place. Pass the class itself.")
def _my_lora(answer):
    if not isinstance(answer, type):
        raise TypeError(f"pass the class itself (check('02.ex5', MyLoRA)), got {type(answer).__name__}")
    reason = first_failure(_LAYER_CASES, lambda case, seed: _check_layer_case(answer, case, seed=seed), seed=100)
    if reason is not None:
        return False, reason
    shapes = "; ".join(f"{d_in}→{d_out}, r={r}{', rsLoRA' if rs else ''}" for d_in, d_out, r, _, rs, _ in _LAYER_CASES)
    return True, (f"your layer equals peft_lab's LoRALinear on {len(_LAYER_CASES)} random layers ({shapes}): "
                  "shapes, initialisation, output, gradients of A and B, and merge.")
