"""Notebook 07's graders: a right answer passes, each known wrong class fails with the hint that names it."""
from __future__ import annotations

import pytest

import peft_lab
from builders import verdict
from peft_lab.estimate import PRECISIONS
from peft_lab.scale_out import shard_rows


def _states(arch, trainable_params, precision):
    e = peft_lab.estimate_memory(arch, trainable_params=trainable_params, batch_size=0, precision=precision)
    master = PRECISIONS[precision]["master"] * e["gradients"] // PRECISIONS[precision]["grad"]
    return e["parameters"] - master, e["gradients"], e["optimizer"] + master, e


def right(arch, ranks, stage, trainable_params=None, precision="fp32"):
    W, G, O, _ = _states(arch, trainable_params, precision)
    return W / ranks ** (stage >= 3) + G / ranks ** (stage >= 2) + O / ranks ** (stage >= 1)


def master_with_parameters(arch, ranks, stage, trainable_params=None, precision="fp32"):
    *_, e = _states(arch, trainable_params, precision)
    return (e["parameters"] / ranks ** (stage >= 3) + e["gradients"] / ranks ** (stage >= 2)
            + e["optimizer"] / ranks ** (stage >= 1))


def divides_everything(arch, ranks, stage, trainable_params=None, precision="fp32"):
    W, G, O, _ = _states(arch, trainable_params, precision)
    return (W + G + O) / ranks


def off_by_one_stage(arch, ranks, stage, trainable_params=None, precision="fp32"):
    return right(arch, ranks, min(stage + 1, 3), trainable_params, precision)


def test_bytes_per_rank_right_and_wrong_classes():
    assert verdict("07.ex1", right)[0]
    assert verdict("07.ex1", lambda *a, **k: {"total": right(*a, **k)})[0]      # the package's dict is fine too
    ok, why = verdict("07.ex1", master_with_parameters)
    assert not ok and "master copy" in why
    ok, why = verdict("07.ex1", divides_everything)
    assert not ok and "every stage" in why
    ok, why = verdict("07.ex1", off_by_one_stage)
    assert not ok and "stage" in why
    with pytest.raises(ValueError, match="nothing"):
        verdict("07.ex1", lambda *a, **k: None)


def test_gpu_count():
    assert verdict("07.ex2", 5)[0]
    assert "stage 2" in verdict("07.ex2", 8)[1]
    assert "round up" in verdict("07.ex2", 4)[1]
    assert not verdict("07.ex2", 4.5)[0] and not verdict("07.ex2", 6)[0]


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
    assert "Right [07.ex3]" in capsys.readouterr().out
