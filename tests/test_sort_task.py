"""Notebook 09's second task, word sorting (peft_lab.corpus.generate_sort_task)."""
from collections import Counter

import pytest

from peft_lab.corpus import SORT_CHOICES, SORT_GROUPS, generate_sort_task, sort_answer


def test_balanced_deterministic_and_recomputable():
    rows = generate_sort_task(300, seed=7)
    assert Counter(r["answer"] for r in rows) == {c: 100 for c in SORT_CHOICES}
    assert all(sort_answer(r["prompt"]) == r["answer"] for r in rows)
    assert generate_sort_task(40, seed=1) == generate_sort_task(40, seed=1)
    assert generate_sort_task(40, seed=1) != generate_sort_task(40, seed=2)
    assert Counter(r["answer"] for r in generate_sort_task(4, seed=0)).most_common(1)[0][1] == 2


def test_the_word_is_never_an_answer_and_groups_do_not_overlap():
    rows = generate_sort_task(200, seed=3)
    words = {r["prompt"].split(" goes with ")[0].split()[-1] for r in rows}
    assert not words & set(SORT_CHOICES)
    groups = list(SORT_GROUPS.values())
    assert not any(set(a) & set(b) for i, a in enumerate(groups) for b in groups[i + 1:])


def test_answers_are_one_token_each_and_evaluate_task_grades_them():
    from peft_lab.data import evaluate_task
    from peft_lab.models import load_base_model
    model, tok = load_base_model("tiny", device="cpu")
    assert all(len(tok.encode(" " + c)) == 1 for c in SORT_CHOICES)
    rows = generate_sort_task(30, seed=2)
    result = evaluate_task(model, tok, rows, choices=SORT_CHOICES)
    assert result["n"] == 30 and 0.0 <= result["accuracy"] <= 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        generate_sort_task(-1, seed=0)
    with pytest.raises(ValueError, match="not a word-sorting prompt"):
        sort_answer("review: the soup was warm . verdict:")
