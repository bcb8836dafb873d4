"""Notebook 01's exercises: right answers accepted, typical wrong ones refused with a useful message."""
from __future__ import annotations

import pytest

import builders
import peft_lab
from peft_lab.corpus import review_verdict
from peft_lab.exercises.nb01 import NEGATED_REVIEWS


def verdict(exercise_id, answer):
    return builders.verdict(exercise_id, answer)


def test_first_clause_shortcut_on_the_whole_split():
    assert verdict("01.ex1", 74.6)[0]
    for wrong, words in ((0.746, "percentage"), (73.7, "first 300"), (75.0, "measured"), (50.0, "constant"),
                         (60.0, "first clause")):
        ok, why = verdict("01.ex1", wrong)
        assert not ok and words in why, why
        assert "74.6" not in why


def test_negated_verdicts_count_the_wrong_ones_without_naming_them():
    """With two labels, naming the wrong reviews would give the answer away: the grader counts them."""
    right = [review_verdict(r) for r in NEGATED_REVIEWS]
    assert verdict("01.ex2", right)[0]
    flipped = ["good" if v == "bad" else "bad" for v in right]
    ok, why = verdict("01.ex2", [flipped[0]] + right[1:])
    assert not ok and "1 of the 4 verdicts" in why and "review 1" not in why and str(right) not in why, why
    assert peft_lab.check("01.ex2", "good", verbose=False) is False      # one string for four reviews


def test_tiny_llama_bytes_and_its_mistakes():
    assert verdict("01.ex3", 2_107_648)[0]
    base, lora = 939_136, 14_336
    for wrong, words in ((16 * (base + lora), "full fine-tuning"), (4 * base + 16 * lora, "2 B"),
                         (2 * base + 16 * 16_384, "grouped-query"), (1_000_000, "meta device")):
        ok, why = verdict("01.ex3", wrong)
        assert not ok and words in why, why
        assert "2,107,648" not in why


def test_encode_runs_on_negated_reviews_too(capsys):
    def encode(example, tok):
        p = tok.encode(example["prompt"])
        a = tok.encode(" " + example["answer"]) + [tok.eos_token_id]
        return {"input_ids": p + a, "labels": [-100] * len(p) + a}
    ok, why = verdict("01.ex4", encode)
    assert ok and "24 examples" in why, why
    from peft_lab.exercises import StudentCodeError
    with pytest.raises(StudentCodeError, match="what this exercise asks you to write"):  # the package's own
        verdict("01.ex4", lambda ex, tok: peft_lab.encode_task([ex], tok)[0])
    assert peft_lab.encode_task is peft_lab.data.encode_task and peft_lab.encode_task.__name__ == "encode_task"
