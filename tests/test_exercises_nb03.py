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
    assert "pass the class itself" in " ".join(capsys.readouterr().out.split())

    class Crashes(GoodParallel):
        def forward(self, x):
            raise RuntimeError("boom")
    assert peft_lab.check("03.ex4", Crashes) is False
    assert "RuntimeError: boom" in " ".join(capsys.readouterr().out.split())


def test_gradient_prediction_is_checked_exactly_and_explained():
    ok, why = verdict_of("03.ex1", 24)
    assert ok and "W_upᵀ = 0" in why, why
    for wrong, words in ((48, "not every tensor"), (12, "two adapters per block"), (6, "measured")):
        ok, why = verdict_of("03.ex1", wrong)
        assert not ok and words in why, why
    assert peft_lab.check("03.ex1", "24", verbose=False) is False


def test_pfeiffer_count_on_llama_and_its_mistakes():
    assert verdict_of("03.ex2", 16_910_336)[0]
    for wrong, words in ((2 * 16_910_336, "Houlsby"), (32 * 2 * 64 * 4096, "biases"), (528_448, "one block"),
                         (1_000_000, "2md + m + d")):
        ok, why = verdict_of("03.ex2", wrong)
        assert not ok and words in why, why
        assert "16,910,336" not in why


def test_debug_checkpoint_keeps_the_adapter_only(tmp_path):
    from peft_lab.adapters import bottleneck_state_dict

    ok, why = verdict_of("03.ex3", lambda model, path: torch.save(model.state_dict(), path))
    assert not ok and "not the adapter's" in why and "frozen base" in why, why
    ok, why = verdict_of("03.ex3", lambda model, path: torch.save(
        {k: v for k, v in list(bottleneck_state_dict(model).items())[:-1]}, path))
    assert not ok and "missing" in why, why
    ok, why = verdict_of("03.ex3", lambda model, path: None)
    assert not ok and "write a file" in why, why
    ok, why = verdict_of("03.ex3", lambda model, path: torch.save(
        {"x." + k: v.clone() for k, v in bottleneck_state_dict(model).items()}, path))
    assert not ok and "under other keys" in why, why
    ok, why = verdict_of("03.ex3", lambda model, path: torch.save(
        {k: v.clone() for k, v in bottleneck_state_dict(model).items()}, path))
    assert ok, why
    from safetensors.torch import save_file  # the format notebook 03 ships adapters in
    ok, why = verdict_of("03.ex3", lambda model, path: save_file(
        {k: v.contiguous() for k, v in bottleneck_state_dict(model).items()}, path))
    assert ok, why


def verdict_of(exercise_id, answer):
    return builders.verdict(exercise_id, answer)
