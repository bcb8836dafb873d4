"""peft_lab.tolerance: the policy every numeric comparison follows (README, "Tests: how close is equal")."""
from __future__ import annotations

import json

import pytest
import torch

from peft_lab.tolerance import COMMITTED, EXACT, REORDERED, assert_close, assert_equal, bound_ratio, is_close


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(seed)) * 3


def test_exact_means_bit_for_bit():
    x = logits()
    assert assert_equal(x, x.clone()) == 0.0
    one_ulp = torch.nextafter(x, torch.full_like(x, float("inf")))
    with pytest.raises(AssertionError, match="bit-for-bit"):
        assert_equal(one_ulp, x, "logits")
    with pytest.raises(AssertionError):
        assert_close(one_ulp, x, EXACT, reason="same order")


def test_reordered_accepts_float32_reordering_and_refuses_a_real_error():
    x = logits()
    # The same sums in another order: float64 reference rounded once vs float32 accumulated in reverse.
    terms = torch.randn(64, 2, 5, 7, generator=torch.Generator().manual_seed(1))
    forward = terms.sum(0)
    backward = torch.zeros_like(forward)
    for t in reversed(terms):
        backward = backward + t
    assert 0 < (forward - backward).abs().max() and is_close(backward, forward)
    assert assert_close(backward, forward, reason="summed in reverse") > 0
    # What the old fixed 1e-6 bound refused on another CPU (5e-6 on logits of magnitude ~3) passes ...
    assert is_close(x + 5e-6, x)
    # ... and what a wrong implementation gives (a small misplaced update) does not.
    with pytest.raises(AssertionError, match="reordered bound"):
        assert_close(x + 1e-3, x, reason="test")
    assert not is_close(x.flatten().roll(1).view_as(x), x)


def test_bounds_scale_with_the_tensor_and_committed_is_looser():
    x = logits()
    small = x * 1e-4  # gradients are small: the bound is relative to the tensor's scale
    assert is_close(small * (1 + 5e-6), small) and not is_close(small + 1e-6, small)
    assert not is_close(x + 5e-4, x, REORDERED) and is_close(x + 5e-4, x, COMMITTED)
    assert bound_ratio(x, x) == 0.0 and bound_ratio(x, x, EXACT) == 0.0


def test_a_reason_is_required_and_shapes_must_agree():
    with pytest.raises(ValueError, match="reason"):
        assert_close(logits(), logits(), reason="")
    with pytest.raises(AssertionError, match="shapes"):
        assert_close(logits()[0], logits(), reason="x")


def test_each_comparison_is_logged_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "tol.jsonl"
    monkeypatch.setenv("PEFT_LAB_TOLERANCE_LOG", str(log))
    x = logits()
    assert_close(x + 1e-6, x, reason="r", what="a")
    assert_equal(x, x, "b")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["tolerance"], r["what"]) for r in rows] == [("reordered", "a"), ("exact", "b")]
    assert 0 < rows[0]["ratio"] < 1 and rows[1]["ratio"] == 0.0
