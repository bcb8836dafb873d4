"""Exercises of notebook 05 (IA3, DoRA, QLoRA). The coding exercises are graded by running the student's code
against peft_lab's own implementation of the same equation; expected numbers are computed, not stored.
"""
from __future__ import annotations

import copy

from . import exercise, number, run_student


def _ia3_reason(cls, d_in: int, d_out: int, shape, seed: int) -> str | None:
    """Run the student's IA3 feed-forward class on one ``nn.Linear(d_in, d_out)``; None if it behaves like
    :class:`peft_lab.ia3.IA3Layer` with ``is_feedforward=True`` (05.2), else the reason."""
    import torch
    from torch import nn

    from ..ia3 import IA3Layer
    from ..tolerance import is_close

    where = f"with nn.Linear({d_in}, {d_out}) and an input of shape {tuple(shape)}"
    torch.manual_seed(seed)
    base, x = nn.Linear(d_in, d_out), torch.randn(shape)
    w0 = base.weight.detach().clone()
    layer = run_student(cls, copy.deepcopy(base))
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if len(trainable) != 1:
        return (f"exactly one trainable tensor (the vector l) is expected, found {[n for n, _ in trainable]} "
                "— freeze the base layer (requires_grad_(False))")
    name, vec = trainable[0]
    if vec.numel() == d_out and d_out != d_in:
        return (f"{name} has d_out = {d_out} entries: that scales the output (05.1). A feed-forward module is "
                f"scaled on its input, d_in = {d_in} entries (05.2)")
    if vec.numel() != d_in:
        return f"{name} has {vec.numel()} entries; the input side of (05.2) needs d_in = {d_in}"
    if not bool((vec.detach() == 1).all()):
        return f"{name} must start at ones, so that the layer starts as the base exactly (05.3)"
    if not any(torch.equal(m.weight.detach(), w0) for m in layer.modules() if isinstance(m, nn.Linear)):
        return "keep the nn.Linear you were given, unchanged, as the frozen base"
    with torch.no_grad():
        if not torch.equal(run_student(layer, x), base(x)):
            return f"at l = 1 the output must equal base(x) exactly {where}"
    ref = IA3Layer(copy.deepcopy(base), is_feedforward=True)
    with torch.no_grad():
        vec.copy_((1 + 0.3 * torch.randn(d_in)).view(vec.shape))
        ref.ia3_l.copy_(vec.detach().view(ref.ia3_l.shape))
    out, expected = run_student(layer, x), ref(x)
    if out.shape != expected.shape or not is_close(out, expected):
        return f"with a random l the output is not base(l ⊙ x) = W(l ⊙ x) + b {where} (05.2)"
    g = torch.randn(expected.shape)
    if out.requires_grad:
        (out * g).sum().backward()
    (expected * g).sum().backward()
    if vec.grad is None:
        return "no gradient reached l: use the parameter itself in forward (not .data or .detach())"
    if not is_close(vec.grad.view(-1), ref.ia3_l.grad.view(-1)):
        return f"the gradient of l differs from IA3's {where}"
    return None


@exercise("05.ex1", "Write an IA3 layer for a feed-forward module: class IA3FeedForward(nn.Module) with "
                    "__init__(self, base) wrapping a frozen nn.Linear and one trainable vector l (ones at the start) "
                    "that scales the layer's INPUT, forward(x) = base(l ⊙ x) (equation 05.2). Pass the class.")
def _ia3_feedforward(answer):
    if not isinstance(answer, type):
        raise TypeError("pass the class itself (IA3FeedForward), not an instance or a number")
    for i, (d_in, d_out, shape) in enumerate([(12, 7, (5, 12)), (16, 16, (2, 3, 16)), (8, 20, (4, 8))]):
        reason = _ia3_reason(answer, d_in, d_out, shape, seed=i)
        if reason:
            return False, reason
    return True, ("your layer computes W(l ⊙ x) + b with l ∈ ℝ^d_in starting at ones, and its gradient is IA3's: "
                  "merged, it is W·diag(l) — each input feature's column rescaled (05.4).")


def _dora_reference(x, W0, bias, A, B, m, s, detach=True):
    """Equation (05.7) with the row norm (over the input dimension), detached as in (05.9) unless told."""
    import torch
    V = W0 + s * B @ A
    norm = V.norm(dim=1, keepdim=True)
    W = m.view(-1, 1) * V / (norm.detach() if detach else norm)
    return torch.nn.functional.linear(x, W, bias)


@exercise("05.ex2", "Write DoRA's forward for one nn.Linear-layout weight: dora_forward(x, W0, bias, A, B, m, s) "
                    "returning x W'ᵀ + b with W' = m ⊙ (W0 + sBA)/‖W0 + sBA‖ (norm of each row, over the input "
                    "dimension), the norm a constant for autograd (05.7, 05.9). Pass the function.")
def _dora_forward(answer):
    import torch

    from ..tolerance import is_close
    if not callable(answer):
        raise TypeError("pass the function itself (dora_forward)")
    for seed, (d_in, d_out, r, shape) in enumerate([(10, 6, 2, (3, 10)), (16, 24, 4, (2, 5, 16))]):
        g = torch.Generator().manual_seed(seed)
        W0, bias = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
        x = torch.randn(shape, generator=g)
        A = (0.3 * torch.randn(r, d_in, generator=g)).requires_grad_()
        B = (0.3 * torch.randn(d_out, r, generator=g)).requires_grad_()
        m = (W0.norm(dim=1) * (1 + 0.2 * torch.randn(d_out, generator=g))).requires_grad_()
        s = 2.0
        where = f"(W0 {d_out} × {d_in}, rank {r})"
        out = run_student(answer, x, W0, bias, A, B, m, s)
        expected = _dora_reference(x, W0, bias, A, B, m, s)
        if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
            return False, f"expected a tensor of shape {tuple(expected.shape)} {where}"
        if not is_close(out, expected):
            V = W0 + s * B @ A
            columns = torch.nn.functional.linear(x, m.view(-1, 1) * V / V.norm(dim=0, keepdim=True), bias)
            if is_close(out, columns):
                return False, (f"the norm runs over the wrong dimension {where}: DoRA's m has one entry per OUTPUT "
                               "feature, so take the norm of each row of W0 + sBA (dim=1), over the inputs")
            return False, f"the output is not x W'ᵀ + b with W' of (05.7) {where}"
        grads = torch.autograd.grad(out.sum(), (A, B, m), allow_unused=True)
        if any(gr is None for gr in grads):
            return False, "no gradient reached A, B or m: use them in the computation (not detached copies)"
        want = torch.autograd.grad(expected.sum(), (A, B, m))
        full = torch.autograd.grad(_dora_reference(x, W0, bias, A, B, m, s, detach=False).sum(), (A, B, m))
        if not all(is_close(a, b) for a, b in zip(grads, want)):
            if all(is_close(a, b) for a, b in zip(grads, full)):
                return False, ("the output is right, but the norm is part of the graph: (05.9) treats "
                               "‖W0 + sBA‖ as a constant in backward — .detach() it")
            return False, f"the gradients of A, B or m differ from DoRA's {where}"
    return True, ("your forward is (05.7) with the row norm detached (05.9): the gradients of A, B and m are "
                  "DoRA's, as PEFT computes them.")


@exercise("05.ex3", "Write nf4_code() returning the 16 NF4 values (QLoRA §3) as a sorted float32 tensor, from "
                    "the normal quantiles with asymmetric halves and an exact zero, scaled to [-1, 1] (05.Q1).")
def _nf4_code(answer):
    import torch

    from ..qlora import NF4_OFFSET, nf4_code
    if not callable(answer):
        raise TypeError("pass the function itself (nf4_code)")
    got = run_student(answer)
    got = torch.as_tensor(got, dtype=torch.float32).flatten()
    want = nf4_code()
    if got.numel() != 16:
        return False, f"4 bits give 16 values, you returned {got.numel()}"
    if not bool((got[1:] >= got[:-1]).all()):
        return False, "sort the values (ascending): an index then means the same value everywhere"
    if not bool((got == 0).any()):
        return False, ("no exact zero: QLoRA's code takes 8 positive and 7 negative quantiles plus 0, so that "
                       "zero weights (and padding) quantize exactly — asymmetric halves")
    if abs(float(got.abs().max()) - 1) > 1e-6:
        return False, "divide by the largest value, so that the code spans [-1, 1] (blocks are scaled by their absmax)"
    if int((got < 0).sum()) != 7:
        return False, f"{int((got < 0).sum())} negative values; the construction has 7 negative, 0 and 8 positive"
    diff = float((got - want).abs().max())
    if diff > 1e-6:
        return False, (f"the values differ from NF4 by up to {diff:.1e}: use Φ⁻¹ (torch.special.ndtri) at 9 and 8 "
                       f"probabilities evenly spaced from {NF4_OFFSET} down to ½, dropping ½ itself")
    return True, "your table is NF4's, value for value (≤ 1e-6): the same table bitsandbytes stores."


@exercise("05.ex4", "NF4 with double quantization and blocks of 128 weights (the absmax constants still in blocks of "
                    "256): how many bits per weight are stored (05.Q4)?")
def _bits(answer):
    from ..qlora import nf4_bits_per_parameter
    expected = nf4_bits_per_parameter(block_size=128, double_quant=True)
    return number(answer, expected, rel_tol=1e-4,
                  mistakes={nf4_bits_per_parameter(64, True): "that is block 64; the question uses 128.",
                            nf4_bits_per_parameter(128, False): "that is without double quantization (fp32 "
                                                                "absmax: 32/128 bits per weight).",
                            4 + 8 / 128: "add the second level: one fp32 constant per 256 absmax values, "
                                         "32/(128·256) bits per weight.",
                            4.0: "the 4-bit indices alone; the absmax constants cost bits too."},
                  explain=f"4 + 8/128 + 32/(128·256) = {expected:.4f} bits (05.Q4).")
