"""Notebook 09's graders: a right answer passes, each known wrong class fails with the hint that names it, and a
wrong number gets a hint without the answer."""
from __future__ import annotations

import torch

import peft_lab
from builders import passes_and_leaves_the_rng_alone, verdict


def test_mixed_batch_prediction():
    ok, why = verdict("09.ex1", 5 * 0.65 + 2 * 0.45 - 2 * 1.3)
    assert ok and "(09.1)" in why
    for wrong, reason in ((3.25, "base alone"), (-1.0, "both adapters"), (-1.7, "adapters' part"),
                          (0.25, "no adapter at all"), (2.0, "not the next"),
                          (1.0, "add the five")):
        ok, why = verdict("09.ex1", wrong)
        assert not ok and reason in why and "1.55" not in why, (wrong, why)


def elect(stacked):                                                   # the solution
    return stacked.sign() == torch.where(stacked.sum(0) >= 0, 1, -1)


def test_sign_election():
    assert verdict("09.ex2", elect)[0]
    ok, why = verdict("09.ex2", lambda t: t.sign() == torch.where(t.sign().sum(0) >= 0, 1, -1))
    assert not ok and "counts votes" in why
    ok, why = verdict("09.ex2", lambda t: (t.sign() == torch.where(t.sum(0) >= 0, 1, -1)) | (t == 0))
    assert not ok and "no sign" in why
    ok, why = verdict("09.ex2", lambda t: t.sign() == torch.where(t.sum(0) > 0, 1, -1))
    assert not ok and "exactly 0" in why
    ok, why = verdict("09.ex2", lambda t: torch.where(t.sum(0) >= 0, 1, -1))
    assert not ok and "not the elected sign alone" in why
    assert not peft_lab.check("09.ex2", lambda t: peft_lab.multi_lora.elect_sign_mask(t), verbose=False)
    assert not peft_lab.check("09.ex2", lambda t: peft_lab.merge_adapters(t, [], []), verbose=False)
    assert not peft_lab.check("09.ex2", peft_lab.multi_lora.elect_sign_mask, verbose=False)
    from peft.utils import merge_utils  # PEFT's election, handed in or called, is refused too
    assert not peft_lab.check("09.ex2", lambda t: merge_utils.calculate_majority_sign_mask(t, method="total"),
                              verbose=False)
    assert passes_and_leaves_the_rng_alone("09.ex2", elect)


def grouped_broken(x, rows, deltas):                                  # the notebook's snippet
    outs = []
    for name in dict.fromkeys(rows):
        index = [b for b, a in enumerate(rows) if a == name]
        outs.append(torch.zeros(len(index), *x.shape[1:-1], next(iter(deltas.values()))(x[:1]).shape[-1])
                    if name == "__base__" else deltas[name](x[index]))
    return torch.cat(outs)


def grouped_fixed(x, rows, deltas):
    d_out = next(iter(deltas.values()))(x[:1]).shape[-1]
    out = torch.zeros(*x.shape[:-1], d_out)
    for name in dict.fromkeys(rows):
        if name != "__base__":
            index = [b for b, a in enumerate(rows) if a == name]
            out[index] = deltas[name](x[index])
    return out


def test_grouped_debug():
    assert verdict("09.ex3", grouped_fixed)[0]
    ok, why = verdict("09.ex3", grouped_broken)
    assert not ok and "grouped by adapter" in why
    ok, why = verdict("09.ex3", lambda x, rows, deltas: torch.cat([deltas[n](x[[b]]) for b, n in enumerate(rows)
                                                                   if n != "__base__"]))
    assert not ok and "'__base__'" in why
    ok, why = verdict("09.ex3", lambda x, rows, deltas: torch.stack([deltas["a"](x[b]) for b in range(len(rows))]))
    assert not ok and "another adapter" in why
