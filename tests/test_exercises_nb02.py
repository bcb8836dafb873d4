"""Notebook 02's exercises (the code exercise 02.ex5 above all) and its one equation numbering."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import builders
import peft_lab
from peft_lab import lora
from peft_lab.exercises import exercises

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "02_lora.ipynb"


class GoodLoRA(nn.Module):
    def __init__(self, base, rank, alpha, use_rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.s = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.merged = False

    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + (x @ self.A.T @ self.B.T) * self.s

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.s * self.B @ self.A
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
        nn.init.constant_(self.A, 0.5 / math.sqrt(base.in_features))


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
    (ConstantA, "standard deviation"), (SqueezedA, "standard deviation"),
])
def test_wrong_layers_fail_with_their_reason(wrong, words):
    ok, why = verdict(wrong)
    assert not ok
    assert words in why, why


def test_not_a_class_is_a_readable_wrong_answer(capsys):
    assert peft_lab.check("02.ex5", GoodLoRA(nn.Linear(2, 2), 1, 1)) is False
    assert "pass the class itself" in capsys.readouterr().out


def test_crashing_layer_reports_the_error():
    class Crashes(GoodLoRA):
        def forward(self, x):
            raise RuntimeError("boom")
    ok, why = verdict(Crashes)
    assert not ok and "RuntimeError: boom" in why


def test_numeric_answers():
    assert peft_lab.check("02.ex1", 16 * (4096 + 4096), verbose=False)
    assert not peft_lab.check("02.ex1", 4096 * 4096, verbose=False)
    assert peft_lab.check("02.ex2", 4.0, verbose=False)
    assert peft_lab.check("02.ex3", 2.0, verbose=False)
    assert not peft_lab.check("02.ex3", 0.25, verbose=False)
    assert peft_lab.check("02.ex4", 0, verbose=False)


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
