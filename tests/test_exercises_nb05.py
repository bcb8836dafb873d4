"""Notebook 05's code exercises: a right answer passes, and each typical mistake is caught with its reason."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import verdict

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# 05.ex1: IA3 for a feed-forward module (input side, 05.2)
# ---------------------------------------------------------------------------------------------------------

class GoodIA3(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.l = nn.Parameter(torch.ones(base.in_features))

    def forward(self, x):
        return self.base(x * self.l)


class OutputSide(GoodIA3):           # scales the output: (05.1), not (05.2)
    def __init__(self, base):
        super().__init__(base)
        self.l = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):
        return self.base(x) * self.l


class NotFrozen(GoodIA3):
    def __init__(self, base):
        super().__init__(base)
        self.base.requires_grad_(True)


class ZeroInit(GoodIA3):
    def __init__(self, base):
        super().__init__(base)
        self.l = nn.Parameter(torch.zeros(base.in_features))


class Detached(GoodIA3):
    def forward(self, x):
        return self.base(x * self.l.detach())


class ScalesAfterBias(GoodIA3):      # right size when square, but l multiplies W x + b, not x
    def forward(self, x):
        w = self.base.weight
        return nn.functional.linear(x, w * self.l, self.base.bias * self.l[: w.shape[0]].mean())


def test_ia3_feedforward_right_and_wrong():
    assert verdict("05.ex1", GoodIA3)[0]
    for cls, words in ((OutputSide, "output"), (NotFrozen, "freeze"), (ZeroInit, "ones"), (Detached, "gradient"),
                       (ScalesAfterBias, "W(l ⊙ x) + b")):
        ok, why = verdict("05.ex1", cls)
        assert not ok and words in why, (cls.__name__, why)


# ---------------------------------------------------------------------------------------------------------
# 05.ex2: DoRA's forward (05.7, 05.9)
# ---------------------------------------------------------------------------------------------------------

def good_dora(x, W0, bias, A, B, m, s):
    V = W0 + s * B @ A
    return nn.functional.linear(x, m.view(-1, 1) * V / V.norm(dim=1, keepdim=True).detach(), bias)


def column_norm(x, W0, bias, A, B, m, s):
    V = W0 + s * B @ A
    return nn.functional.linear(x, m.view(-1, 1) * V / V.norm(dim=0, keepdim=True).detach(), bias)


def norm_in_graph(x, W0, bias, A, B, m, s):
    V = W0 + s * B @ A
    return nn.functional.linear(x, m.view(-1, 1) * V / V.norm(dim=1, keepdim=True), bias)


def no_scaling(x, W0, bias, A, B, m, s):
    return good_dora(x, W0, bias, A, B, m, 1.0)


def plain_lora(x, W0, bias, A, B, m, s):
    return nn.functional.linear(x, W0 + s * B @ A, bias)


def test_dora_forward_right_and_wrong():
    assert verdict("05.ex2", good_dora)[0]
    for fn, words in ((column_norm, "wrong dimension"), (norm_in_graph, "detach"), (no_scaling, "(05.7)"),
                      (plain_lora, "(05.7)")):
        ok, why = verdict("05.ex2", fn)
        assert not ok and words in why, (fn.__name__, why)


# ---------------------------------------------------------------------------------------------------------
# 05.ex3: the NF4 code (05.Q1); 05.ex4: bits per weight (05.Q4)
# ---------------------------------------------------------------------------------------------------------

def _halves(delta=0.5 * (1 / 32 + 1 / 30)):
    pos = torch.special.ndtri(torch.linspace(1 - delta, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(1 - delta, 0.5, 8)[:-1].double())
    return pos, neg


def good_code():
    pos, neg = _halves()
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.max()).float()


def symmetric_code():                 # 8 + 8 quantiles, no zero
    pos, _ = _halves()
    return (torch.cat([-pos, pos]).sort().values / pos.max()).float()


def unscaled_code():
    pos, neg = _halves()
    return torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values.float()


def unsorted_code():
    return good_code().flip(0)


def other_offset_code():              # δ = 0.05: the right shape, other values
    pos, neg = _halves(0.05)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.max()).float()


def test_nf4_code_right_and_wrong():
    assert verdict("05.ex3", good_code)[0]
    for fn, words in ((symmetric_code, "exact zero"), (unscaled_code, "largest"), (unsorted_code, "sort"),
                      (other_offset_code, "differ from NF4"), (lambda: torch.linspace(-1, 1, 15), "16 values")):
        ok, why = verdict("05.ex3", fn)
        assert not ok and words in why, (fn, why)


def test_bits_per_weight():
    assert verdict("05.ex4", 4 + 8 / 128 + 32 / (128 * 256))[0]
    for answer, words in ((4.127, "block 64"), (4.25, "without double"), (4.0625, "second level")):
        ok, why = verdict("05.ex4", answer)
        assert not ok and words in why, (answer, why)
