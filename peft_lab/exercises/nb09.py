"""Exercises of notebook 09 (many adapters on one base). Expected answers are computed, not stored: the
mixed-batch sum by equation (09.1) row by row, the sign election by PEFT's own ``calculate_majority_sign_mask``,
the debugged grouped batch against each row served alone."""
from __future__ import annotations

from . import exercise, run_student
from .hinted import hinted

# 09.ex1's setting: every row has the same input; the first entry of W x, and of each adapter's s·B·A·x.
BASE_OUT, DELTAS = 0.65, {"math": 0.45, "code": -1.3}
ROWS = ["code", "__base__", "math", "code", "math"]


def _mixed_sum(rows=ROWS) -> float:
    """(09.1) row by row: the base output plus the delta of the row's own adapter (none for "__base__")."""
    return sum(BASE_OUT + DELTAS.get(a, 0.0) for a in rows)


@exercise("09.ex1", f"Predict: a layer's rows all have the same input x; the first entry of W x is {BASE_OUT}, of "
                    f"adapter 'math''s s·B·A·x {DELTAS['math']}, of adapter 'code''s {DELTAS['code']}. A mixed "
                    f"batch of five rows runs with adapter_names = {ROWS}. What is the sum over the five rows of "
                    "the first entry of the layer's output? (A number; within 1% counts.)", kind="predict",
          hidden=lambda: [f"{_mixed_sum():.2f}", f"{_mixed_sum():g}"])
def _predict(answer):
    want = _mixed_sum()
    every = len(ROWS) * (BASE_OUT + sum(DELTAS.values()))
    mistakes = {len(ROWS) * BASE_OUT: "that is the base alone on every row: each row also gets its own adapter's "
                                      "delta (09.1).",
                every: "that adds both adapters to every row, as a merged model with both would; in a mixed batch "
                       "each row gets only the delta of the adapter its name picks.",
                _mixed_sum(["code", "code", "math", "code", "math"]):
                    "the '__base__' row gets no adapter at all (an all-zero delta), not its neighbour's.",
                _mixed_sum(["code", "math", "math", "code", "math"]):
                    "the '__base__' row gets no adapter at all, not the next one's.",
                sum(DELTAS.get(a, 0.0) for a in ROWS): "that is the adapters' part only; add W x of every row."}
    mistakes.pop(want, None)
    return hinted(answer, want, rel_tol=1e-2, mistakes=mistakes,
                  explain=(f"{want:.2f}: each row is W x plus the delta of its own adapter — two 'code' rows, two "
                           "'math' rows, one base row with no delta (09.1). Grouped or gathered, the sum is the same."),
                  hint="write each row's first entry by (09.1): W x plus the delta of the adapter named for that row, "
                       "then add the five.")


def _sign_cases():
    """Stacks of trimmed factors (adapters on dim 0) where the vote by size and the vote by count disagree,
    with exact ties, zeros from trimming, and 2–4 adapters."""
    import torch
    g = torch.Generator().manual_seed(9)
    cases = [torch.tensor([[3.0, -1.0, 0.0, 2.0], [-1.0, -1.0, 0.0, -2.0], [-1.0, 0.5, 0.0, 0.0]])]
    for n in (2, 3, 4):
        t = torch.randn(n, 5, 7, generator=g) * torch.rand(n, 1, 1, generator=g) * 4
        t[torch.rand(n, 5, 7, generator=g) < 0.4] = 0.0          # trimmed entries
        cases.append(t)
    return cases


@exercise("09.ex2", "Build TIES's sign election: elect(stacked) -> a boolean tensor of stacked's shape. stacked "
                    "holds N trimmed factors on dim 0; per entry the elected sign is the sign of the sum over the N "
                    "(a sum of exactly 0 elects +), and the mask is True where an adapter's entry has that sign. "
                    "Pass the function itself (the grader runs it; peft_lab's and PEFT's own elections are switched "
                    "off meanwhile).",
          kind="build", hidden=lambda: [])
def _elect(answer):
    import torch
    from peft.utils.merge_utils import calculate_majority_sign_mask

    from ..multi_lora import _combine, elect_sign_mask, merge_adapters
    for stacked in _sign_cases():
        want = calculate_majority_sign_mask(stacked, method="total")
        # PEFT's election too: handing it in (or calling it) answers without building anything
        got = run_student(answer, stacked.clone(),
                          forbid=(elect_sign_mask, merge_adapters, _combine, calculate_majority_sign_mask))
        if not isinstance(got, torch.Tensor) or got.shape != stacked.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return False, (f"elect returned {shape} for a stack of shape {tuple(stacked.shape)}: return one mask "
                           "entry per adapter and entry (the mask, not the elected sign alone)")
        got = got.bool() if got.dtype != torch.bool and bool(((got == 0) | (got == 1)).all()) else got
        if got.dtype != torch.bool:
            return False, f"elect returned a {got.dtype} tensor: return a boolean mask (True where the signs agree)"
        if torch.equal(got, want):
            continue
        if torch.equal(got, calculate_majority_sign_mask(stacked, method="frequency")):
            return False, ("that counts votes (the sign held by more adapters); TIES elects by total size: the sign "
                           "of the sum of the entries, so one large entry outvotes two small ones.")
        if torch.equal(got, want | (stacked == 0)) or bool((got & (stacked == 0)).any()):
            return False, ("a trimmed entry (0) has no sign and must not count as agreeing: otherwise the disjoint "
                           "mean divides by adapters that contribute nothing.")
        if torch.equal(got, stacked.sign() == torch.where(stacked.sum(0) > 0, 1, -1)):
            return False, "where the sum is exactly 0, TIES (and PEFT) elect +, not −."
        return False, "the mask differs from TIES's election on some entries: elect by the sign of the sum over dim 0."
    return True, ("the sign of the summed entries, then the entries that carry it: PEFT's "
                  "calculate_majority_sign_mask(method='total'). The disjoint merge then averages only those.")


def _grouped_case(seed: int):
    """A batch B × T × d, row names with a base row and adapters out of order, and deltas (functions)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    B, T, d_in, d_out, r = 6, 3, 5, 4, 2
    x = torch.randn(B, T, d_in, generator=g)
    names = ["b", "a", "__base__", "b", "c", "a"]
    factors = {n: (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for n in "abc"}
    deltas = {n: (lambda h, A=A, B_=B_: h @ A.T @ B_.T) for n, (A, B_) in factors.items()}
    want = torch.stack([torch.zeros(T, d_out) if n == "__base__" else deltas[n](x[b]) for b, n in enumerate(names)])
    return x, names, deltas, want


@exercise("09.ex3", "Debug: grouped_delta(x, rows, deltas) should return the adapters' part of a mixed batch "
                    "(09.2): for each adapter one sub-batch of its rows, deltas[name](x[rows of name]), and zeros "
                    "for '__base__' rows, with row b of the result belonging to row b of x. The notebook's version "
                    "gives wrong outputs unless each adapter's rows are contiguous in the batch. Fix it and pass the "
                    "fixed function.", kind="debug", hidden=lambda: [])
def _grouped(answer):
    import torch
    for seed in (90, 91):
        x, names, deltas, want = _grouped_case(seed)
        got = run_student(answer, x, list(names), deltas)
        if not isinstance(got, torch.Tensor):
            return False, f"grouped_delta returned {type(got).__name__}; return a tensor"
        if got.shape != want.shape:
            return False, (f"the result has shape {tuple(got.shape)}, the batch {tuple(want.shape)}: a '__base__' "
                           "row still needs its row in the output (zeros).")
        if torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            continue
        order = [b for n in dict.fromkeys(names) for b, a in enumerate(names) if a == n]
        if torch.allclose(got, want[order], rtol=1e-5, atol=1e-6):
            return False, ("every row's delta is right but the rows come back grouped by adapter, not in the batch's "
                           "order: write each group's result back at its own row indices.")
        return False, "some rows get another adapter's delta (or a base row gets one): compare each row with (09.1)."
    return True, ("each group's result goes back to its own rows (out[index] = …): the grouped batch computes the "
                  "same rows as (09.1), only in another order, and must return them in the batch's order.")

