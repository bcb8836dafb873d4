"""Notebook 07's graders: a right answer passes, each known wrong class fails with the hint that names it, and a
wrong number gets a hint without the answer."""
from __future__ import annotations

import pytest
import torch.nn.functional as F

import peft_lab
from builders import verdict
from peft_lab.scale_out import shard_rows


def test_adam_prediction():
    ok, why = verdict("07.ex1", 1e-2 * 3e-8 / (3e-8 + 1e-8))
    assert ok and "75% of lr" in why
    assert verdict("07.ex1", 7.3e-3)[0]                           # within the stated 5%
    for wrong, reason in ((1e-2, "|g| ≫ ε"), (3e-10, "SGD"), (3e-2, "does not replace"), (5e-3, "too low"),
                          (-7.5e-3, "absolute value")):
        ok, why = verdict("07.ex1", wrong)
        assert not ok and reason in why and "0.0075" not in why and "7.5e-03" not in why


def test_gpu_count_stage_2():
    assert verdict("07.ex2", 4)[0]
    ok, why = verdict("07.ex2", 3)
    assert not ok and "stage 3" in why
    ok, why = verdict("07.ex2", 4.5)
    assert not ok and "whole number" in why
    for wrong in (6, 9, 1):
        ok, why = verdict("07.ex2", wrong)
        assert not ok and "(07.1)" in why and "4 GPUs" not in why


def test_gpu_count_names_a_gb_slip():
    from peft_lab.exercises.nb07 import _gpus_needed
    gib, gb = _gpus_needed(2, 40 * 2**30), _gpus_needed(2, 40e9)
    if gb != gib:                                                   # only where the units change the count
        ok, why = verdict("07.ex2", gb)
        assert not ok and "GiB" in why


def rank_mean(logits, labels, n_global, world):                     # the notebook's broken snippet
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def rank_sum_global(logits, labels, n_global, world):               # the fix
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss * world / n_global


def test_rank_loss_debug():
    assert verdict("07.ex4", rank_sum_global)[0]
    ok, why = verdict("07.ex4", rank_mean)
    assert not ok and "1 / n_global" in why
    ok, why = verdict("07.ex4", lambda *a: rank_sum_global(*a) / a[3])
    assert not ok and "world times its share" in why
    ok, why = verdict("07.ex4", lambda *a: rank_sum_global(*a) * a[3])
    assert not ok and "too large" in why


def chunked(model, ranks):
    out = [0] * ranks
    for p in model.parameters():
        rows, row = (p.shape[0], p[0].numel()) if p.dim() else (1, 1)
        for r in range(ranks):
            out[r] += shard_rows(rows, ranks, r) * row
    return out


def even_split(model, ranks):
    total = sum(p.numel() for p in model.parameters())
    return [total // ranks + (r < total % ranks) for r in range(ranks)]


def tied_twice(model, ranks):
    out = chunked(model, ranks)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out[0] += head.weight.numel()
    return out


def last_rank_gets_more(model, ranks):  # floor-sized chunks, the remainder on the last rank
    out = [0] * ranks
    for p in model.parameters():
        rows, row = (p.shape[0], p[0].numel()) if p.dim() else (1, 1)
        for r in range(ranks):
            out[r] += (rows // ranks + (rows % ranks if r == ranks - 1 else 0)) * row
    return out


def test_elements_per_rank_right_and_wrong_classes():
    assert verdict("07.ex3", chunked)[0]
    ok, why = verdict("07.ex3", even_split)
    assert not ok and "even split" in why
    ok, why = verdict("07.ex3", tied_twice)
    assert not ok and "tied head" in why
    ok, why = verdict("07.ex3", last_rank_gets_more)
    assert not ok and "ceil(rows / ranks)" in why
    ok, why = verdict("07.ex3", lambda model, ranks: [sum(p.numel() for p in model.parameters())])
    assert not ok and "one count per rank" in why


def test_check_prints_right_for_the_solutions(capsys):
    assert peft_lab.check("07.ex3", chunked)
    assert "Right [07.ex3]" in " ".join(capsys.readouterr().out.split())


def test_the_package_function_is_not_an_answer():
    """07.ex3 asks to build the count: handing in peft_lab's own function is refused while the grader runs."""
    from peft_lab.exercises import StudentCodeError
    with pytest.raises(StudentCodeError, match="what this exercise asks you to write"):
        verdict("07.ex3", lambda model, ranks: peft_lab.scale_out.fsdp_elements_per_rank(model, ranks))
    with pytest.raises(StudentCodeError, match="the package's own answer"):
        verdict("07.ex3", peft_lab.scale_out.fsdp_elements_per_rank)
