"""How close is "equal": the one tolerance policy of the tests and the notebooks (README, "Tests").

Float32 results depend on the order of operations, and that order depends on the CPU's kernels, the thread
count, the torch build and on whether a library fuses or splits an operation. So a comparison states which
of three cases it is:

* :data:`EXACT` — the same computation in the same order in the same process (switching a method off,
  save → load, merge → unmerge of the same tensors, a file written back): ``torch.equal``, bit for bit.
* :data:`REORDERED` — the same maths in another order (another library, merged vs unmerged, a fused vs a
  split projection, per row vs batched): ``|a − b| ≤ atol + rtol·|b|`` with ``rtol = 1e-5`` and ``atol =
  rtol · max|b|``. Float32 has a relative spacing of 1.2e-7 (one ulp); a reduction of n terms in another order
  moves its result by a few ulps of its *largest* terms, and a few layers stack such moves — so the bound is
  relative to the tensor's scale, about 84 ulps of it (the README lists the worst cases measured).
* :data:`COMMITTED` — against numbers written to a file on another machine (another CPU, torch, library
  version): ten times looser, ``rtol = 1e-4``.

A real error is orders of magnitude larger (a misplaced adapter moves logits by ~0.1), so these bounds still
catch it. Every helper returns the largest ``|Δ|`` so that the caller can print it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "EXACT", "REORDERED", "COMMITTED", "max_abs_diff", "bound_ratio", "assert_equal",
           "assert_close", "is_close"]


@dataclass(frozen=True)
class Tolerance:
    """One case of the policy: ``rtol`` relative to each element, plus ``rtol`` times the tensor's scale."""
    name: str
    rtol: float
    when: str


EXACT = Tolerance("exact", 0.0, "same computation, same order, same process")
REORDERED = Tolerance("reordered", 1e-5, "same maths, another order of float32 operations")
COMMITTED = Tolerance("committed", 1e-4, "against numbers computed on another machine")


def _pair(actual, expected) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(actual).detach().double().cpu()
    b = torch.as_tensor(expected).detach().double().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def max_abs_diff(actual, expected) -> float:
    """``max |actual − expected|`` over all elements, as a Python float."""
    a, b = _pair(actual, expected)
    return (a - b).abs().max().item() if a.numel() else 0.0


def bound_ratio(actual, expected, tol: Tolerance = REORDERED) -> float:
    """The worst ``|Δ| / (atol + rtol·|b|)`` over all elements: ≤ 1 passes; 0 means equal bit for bit."""
    a, b = _pair(actual, expected)
    if not a.numel():
        return 0.0
    diff = (a - b).abs()
    if tol.rtol == 0:
        return 0.0 if not diff.any() else float("inf")
    scale = b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return (diff / (tol.rtol * scale + tol.rtol * b.abs())).max().item()


def _log(kind: str, what: str, diff: float, ratio: float) -> None:
    """Append one line to ``$PEFT_LAB_TOLERANCE_LOG`` (if set): how close each comparison came to its bound."""
    path = os.environ.get("PEFT_LAB_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tolerance": kind, "what": what, "max_abs_diff": diff, "ratio": ratio,
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")


def assert_equal(actual, expected, what: str = "") -> float:
    """Bit for bit (:data:`EXACT`): ``torch.equal``. Returns 0.0, the largest difference."""
    ok = torch.equal(torch.as_tensor(actual), torch.as_tensor(expected))
    diff = 0.0 if ok else max_abs_diff(actual, expected)
    _log(EXACT.name, what, diff, 0.0 if ok else float("inf"))
    if not ok:
        raise AssertionError(f"{what or 'tensors'}: expected bit-for-bit equality, max |Δ| = {diff:.3g}")
    return 0.0


def assert_close(actual, expected, tol: Tolerance = REORDERED, *, reason: str, what: str = "") -> float:
    """``actual`` equals ``expected`` within ``tol`` (see the module docstring); returns ``max |Δ|``.

    ``reason`` says in a few words why the order of operations differs (it is shown on failure), so that every
    call site of a non-exact comparison carries its justification.
    """
    if not reason:
        raise ValueError("reason must say why the two computations differ in order (e.g. 'PEFT sums per row')")
    if tol is EXACT:
        return assert_equal(actual, expected, what)
    diff, ratio = max_abs_diff(actual, expected), bound_ratio(actual, expected, tol)
    _log(tol.name, what, diff, ratio)
    if not ratio <= 1.0:
        raise AssertionError(f"{what or 'tensors'}: max |Δ| = {diff:.3g} is {ratio:.2f}× the {tol.name} bound "
                             f"(rtol {tol.rtol:g} of each value and of the scale); reason allowed: {reason}")
    return diff


def is_close(actual, expected, tol: Tolerance = REORDERED) -> bool:
    """The check of :func:`assert_close` as a boolean, for a notebook to print."""
    return bound_ratio(actual, expected, tol) <= 1.0
