"""Notebook 00's exercises: right answers accepted, typical wrong ones refused with a hint or the mistake named,
never with the worked answer."""
from __future__ import annotations

import builders
import peft_lab
from peft_lab.estimate import PRECISIONS

STATE = {"adamw": 8, "sgd_momentum": 4, "sgd": 0}


def verdict(exercise_id, answer):
    return builders.verdict(exercise_id, answer)


def test_sgd_momentum_bytes_a_total_or_a_breakdown():
    assert verdict("00.ex1", 12)[0] and verdict("00.ex1", (4, 4, 4))[0]
    ok, why = verdict("00.ex1", 16)
    assert not ok and "AdamW" in why
    ok, why = verdict("00.ex1", (4, 4, 8))
    assert not ok and "add up to 16" in why and "opt.state" in why
    ok, why = verdict("00.ex1", 13)
    assert not ok and "too high" in why and "12" not in why
    assert peft_lab.check("00.ex1", "sixteen", verbose=False) is False


def test_big_gpt2_in_gib_and_unit_slips():
    assert verdict("00.ex2", 39.51)[0]
    for wrong, words in ((42.42, "GB"), (39.51 * 1024, "MiB"), (29.63, "second moment"), (30.0, "too low")):
        ok, why = verdict("00.ex2", wrong)
        assert not ok and words in why, why
        assert "39.51" not in why


def test_llama_lora_percent():
    assert verdict("00.ex3", 0.1243)[0]
    for wrong, words in ((0.001243, "fraction"), (0.0622, "half"), (0.5, "Per projection")):
        ok, why = verdict("00.ex3", wrong)
        assert not ok and words in why, why


def test_activations_hint_and_unit_slips():
    assert verdict("00.ex4", 5132)[0]
    for wrong, words in ((5132 * 2**20 / 1e6, "MB"), (5132 / 1024, "GiB"), (4000, "Eq. (6)")):
        ok, why = verdict("00.ex4", wrong)
        assert not ok and words in why, why
        assert "5,132" not in why


def right(n_params, n_trainable, precision, optimizer):
    b = PRECISIONS[precision]
    return b["weight"] * n_params + (b["master"] + b["grad"] + STATE[optimizer]) * n_trainable


def test_model_state_bytes_for_three_optimizers():
    assert builders.passes_and_leaves_the_rng_alone("00.ex5", right)
    ok, why = verdict("00.ex5", lambda n, t, p, o: right(n, t, p, "adamw"))
    assert not ok and "sgd_momentum" in why, why
    ok, why = verdict("00.ex5", lambda n, t, p, o: 16 * n)
    assert not ok and "frozen parameter" in why, why
    ok, why = verdict("00.ex5",
                      lambda n, t, p, o: right(n, t, "fp32", o) if p == "fp32" else 2 * n + (2 + STATE[o]) * t)
    assert not ok and "master" in why, why
