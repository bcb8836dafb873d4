"""Notebook 02's exercises: a right answer accepted, typical wrong ones refused with a useful message (the code
exercise 02.ex5 and the debug exercise 02.ex4 above all), and the notebook's one equation numbering."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import builders
import peft_lab
from peft_lab import apply_lora, lora
from peft_lab.exercises import exercises

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "02_lora.ipynb"


class GoodLoRA(nn.Module):
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.conv = isinstance(base, Conv1D)                 # weight stored as (in, out)
        d_in, d_out = base.weight.shape if self.conv else base.weight.shape[::-1]
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.s = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False

    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + (x @ self.A.T @ self.B.T) * self.s

    @torch.no_grad()
    def merge(self):
        delta = self.s * self.B @ self.A
        self.base.weight += delta.T if self.conv else delta
        self.merged = True


class LinearOnly(GoodLoRA):          # the notebook's MiniLoRA layout: assumes nn.Linear's (out, in) weight
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        d_out, d_in = base.weight.shape
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, d_in), a=math.sqrt(5)))
        self.B = nn.Parameter(torch.zeros(d_out, rank))


class MergeNotTransposed(GoodLoRA):  # right shapes, but adds s·BA to a Conv1D's (in, out) weight untransposed
    @torch.no_grad()
    def merge(self):
        delta = self.s * self.B @ self.A
        if self.conv and delta.shape != self.base.weight.shape:
            self.base.weight += delta.T.flip(0)      # a same-shape but wrong update
        else:
            self.base.weight += delta
        self.merged = True


class PlainScaling(GoodLoRA):        # ignores use_rslora
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha)


class DoubleCounting(GoodLoRA):      # merges, then still adds the branch
    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.s


class NotFrozen(GoodLoRA):
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        self.base.requires_grad_(True)


class RandomB(GoodLoRA):
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        nn.init.normal_(self.B)


class DetachedA(GoodLoRA):
    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + (x @ self.A.detach().T @ self.B.T) * self.s


class FlagOnlyMerge(GoodLoRA):       # claims to merge but leaves W alone
    def merge(self):
        pass


class ConstantA(GoodLoRA):          # A inside ±1/√d_in, but every entry the same
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        nn.init.constant_(self.A, 0.5 / math.sqrt(self.A.shape[1]))


class SqueezedA(GoodLoRA):          # A drawn, but far narrower than an nn.Linear's weight
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        nn.init.normal_(self.A, std=0.01)


class Transposed(GoodLoRA):          # A stored as (in, r)
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__(base, rank, alpha, use_rslora)
        self.A = nn.Parameter(self.A.detach().T.clone())


def verdict(answer):
    return builders.verdict("02.ex5", answer)


def test_a_correct_layer_passes_and_grading_leaves_the_rng_alone():
    assert builders.passes_and_leaves_the_rng_alone("02.ex5", GoodLoRA)


@pytest.mark.parametrize("wrong, words", [
    (PlainScaling, "α/√r"), (DoubleCounting, "merge"), (NotFrozen, "frozen"), (RandomB, "B must start at zero"),
    (DetachedA, "no gradient reached A"), (FlagOnlyMerge, "W0 + s·BA"), (Transposed, "A has shape"),
    (ConstantA, "standard deviation"), (SqueezedA, "standard deviation"), (LinearOnly, "has shape"),
    (MergeNotTransposed, "transposed"),
])
def test_wrong_layers_fail_with_their_reason(wrong, words):
    ok, why = verdict(wrong)
    assert not ok
    assert words in why, why


def test_not_a_class_is_a_readable_wrong_answer(capsys):
    assert peft_lab.check("02.ex5", GoodLoRA(nn.Linear(2, 2), 1, 1)) is False
    assert "pass the class itself" in " ".join(capsys.readouterr().out.split())


def test_crashing_layer_reports_the_error():
    class Crashes(GoodLoRA):
        def forward(self, x):
            raise RuntimeError("boom")
    ok, why = verdict(Crashes)
    assert not ok and "RuntimeError: boom" in why


def test_gqa_count_and_its_mistakes():
    ok, why = verdict_of("02.ex1", 13_631_488)
    assert ok, why
    for wrong, words in ((32 * 4 * 16 * 8192, "grouped-query"), (425_984, "one layer"),
                         (32 * (16 * 8192 + 16 * 5120), "q_proj and v_proj only"), (13_000_000, "per projection")):
        ok, why = verdict_of("02.ex1", wrong)
        assert not ok and words in why, why
        assert "13,631,488" not in why          # a wrong try gets a hint, not the worked answer


def test_memory_prediction_within_its_margin_and_explained():
    ok, why = verdict_of("02.ex2", 100.0)      # about 103 MiB measured: within ±5%
    assert ok and "Activations went from" in why, why
    ok, why = verdict_of("02.ex2", 4 * 28.63)  # everything scaled by 4
    assert not ok and "only the activations grow" in why, why
    ok, why = verdict_of("02.ex2", 30.0)       # as if the batch did not matter
    assert not ok and "measured" in why, why
    assert peft_lab.check("02.ex2", "a lot", verbose=False) is False


def test_rslora_alpha_and_its_mistakes():
    assert verdict_of("02.ex3", 11.31)[0] and verdict_of("02.ex3", 2 * math.sqrt(32))[0]
    for wrong, words in ((64, "α/r"), (16, "2.83"), (5.66, "r = 8"), (10.0, "solve")):
        ok, why = verdict_of("02.ex3", wrong)
        assert not ok and words in why, why
        assert "11.31" not in why


def _train_lora(order_bug=False, mutate_base=False):
    def train_lora(base, batches, lr=1e-2):
        model = base if mutate_base else __import__("copy").deepcopy(base)
        if order_bug:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model = apply_lora(model, rank=8, alpha=16)
        if not order_bug:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for b in batches:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
        return model
    return train_lora


def test_debug_optimizer_before_the_adapter():
    ok, why = verdict_of("02.ex4", _train_lora())
    assert ok, why
    ok, why = verdict_of("02.ex4", _train_lora(order_bug=True))
    assert not ok and "lora_B is still zero" in why, why
    ok, why = verdict_of("02.ex4", _train_lora(mutate_base=True))
    assert not ok and "copy" in why, why
    ok, why = verdict_of("02.ex4", lambda base, batches: base)
    assert not ok and "no LoRA layers" in why, why


def verdict_of(exercise_id, answer):
    return builders.verdict(exercise_id, answer)


def test_exercise_ids_cannot_be_read_as_equation_tags():
    ids = [e.id for e in exercises("02")]
    assert ids and all(re.fullmatch(r"02\.ex\d+", i) for i in ids), ids


def test_equation_tags_agree_between_notebook_and_package():
    """One numbering: each \\tag{02.N} of the notebook is listed in lora.py's docstring, in the same order."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    tags = re.findall(r"\\tag\{(02\.\d+)\}", text)
    listed = re.findall(r"^\* \((02\.\d+)\)", lora.__doc__, flags=re.M)
    assert tags == listed == [f"02.{i}" for i in range(1, len(tags) + 1)]
