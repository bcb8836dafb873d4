"""Notebook 03's code exercise 03.ex4 (a parallel adapter with its own scaling): a right class passes, each
typical mistake fails with its reason."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import builders
import peft_lab


class GoodParallel(nn.Module):
    def __init__(self, sublayer, d, m, s):
        super().__init__()
        self.sublayer, self.s = sublayer.requires_grad_(False), s
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.sublayer(x) + self.s * self.up(torch.relu(self.down(x)))


class NoScaling(GoodParallel):
    def forward(self, x):
        return self.sublayer(x) + self.up(torch.relu(self.down(x)))


class Sequential(GoodParallel):          # reads the sublayer's output: Houlsby's place, not parallel
    def forward(self, x):
        y = self.sublayer(x)
        return y + self.s * self.up(torch.relu(self.down(y)))


class NoRelu(GoodParallel):
    def forward(self, x):
        return self.sublayer(x) + self.s * self.up(self.down(x))


class WithResidual(GoodParallel):        # adds the block's skip itself
    def forward(self, x):
        return x + super().forward(x)


class NotFrozen(GoodParallel):
    def __init__(self, sublayer, d, m, s):
        super().__init__(sublayer, d, m, s)
        self.sublayer.requires_grad_(True)


class RandomUp(GoodParallel):            # not an identity at init
    def __init__(self, sublayer, d, m, s):
        super().__init__(sublayer, d, m, s)
        nn.init.normal_(self.up.weight, std=0.02)


class ZeroDown(GoodParallel):            # both factors zero: nothing would ever move
    def __init__(self, sublayer, d, m, s):
        super().__init__(sublayer, d, m, s)
        nn.init.zeros_(self.down.weight)


class DetachedDown(GoodParallel):
    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, self.down.weight.detach(), self.down.bias))
        return self.sublayer(x) + self.s * self.up(h)


def verdict(answer):
    return builders.verdict("03.ex4", answer)


def test_a_correct_adapter_passes_and_grading_leaves_the_rng_alone():
    assert builders.passes_and_leaves_the_rng_alone("03.ex4", GoodParallel)


@pytest.mark.parametrize("wrong, words", [
    (NoScaling, "scaling s is missing"), (Sequential, "reads the sublayer's output"), (NoRelu, "nonlinearity"),
    (WithResidual, "residual"), (NotFrozen, "freeze the sublayer"), (RandomUp, "start at zero"),
    (ZeroDown, "down must not start at zero"), (DetachedDown, "no gradient reached down.weight"),
])
def test_wrong_adapters_fail_with_their_reason(wrong, words):
    ok, why = verdict(wrong)
    assert not ok
    assert words in why, why


def test_not_a_class_and_a_crash_are_readable_wrong_answers(capsys):
    assert peft_lab.check("03.ex4", GoodParallel(nn.Identity(), 4, 2, 1.0)) is False
    assert "pass the class itself" in capsys.readouterr().out

    class Crashes(GoodParallel):
        def forward(self, x):
            raise RuntimeError("boom")
    assert peft_lab.check("03.ex4", Crashes) is False
    assert "RuntimeError: boom" in capsys.readouterr().out
