"""Exercises of notebook 01 (base model and task). Expected answers are computed, not stored."""
from __future__ import annotations

from ..corpus import review_verdict
from . import exercise, number


@exercise("01.1", "Accuracy of a model that always answers 'good' on the test split (a fraction in [0, 1])?")
def _always_good(answer):
    from ..data import load_task
    rows = load_task("test")
    expected = sum(r["answer"] == "good" for r in rows) / len(rows)
    return number(answer, expected, rel_tol=1e-3,
                  mistakes={100 * expected: "give a fraction in [0, 1], not a percentage."},
                  explain=f"labels are balanced, so a constant answer scores {expected:.2f}: the chance "
                          "level any zero-shot result must be compared with.")


EXAMPLE_REVIEW = "review: the tea was not cold . the room was dirty . the guide was never rude . verdict:"


@exercise("01.2", f"What is the verdict of: {EXAMPLE_REVIEW!r}? Answer 'good' or 'bad'.")
def _verdict(answer):
    if not isinstance(answer, str):
        raise TypeError("answer with the string 'good' or 'bad'")
    expected = review_verdict(EXAMPLE_REVIEW)
    if answer.strip().lower() == expected:
        return True, "'not cold' and 'never rude' are positive, 'dirty' negative: 2 of 3 positive -> good."
    return False, "negators flip a clause: 'not cold' counts as positive. Count the positive clauses."


@exercise("01.3", "How many bytes does full fine-tuning of the tiny model with fp32 AdamW need for weights, "
                  "gradients and optimizer state together (activations excluded)?")
def _bytes(answer):
    from ..measure import count_parameters
    from ..models import build_from_config
    _, n = count_parameters(build_from_config("tiny", device="meta"))
    return number(answer, 16 * n, rel_tol=1e-3,
                  mistakes={4 * n: "that is the weights alone; add gradients (4 B) and two Adam moments (8 B).",
                            8 * n: "weights + gradients; AdamW also keeps two moments per parameter (8 B).",
                            12 * n: "you kept one Adam moment; AdamW keeps two (exp_avg and exp_avg_sq)."},
                  explain=f"{n:,} parameters x (4 weight + 4 gradient + 8 Adam) bytes = {16 * n:,} B.")
