"""Notebook 08's graders: a right answer passes, plausible wrong ones fail with a message that says why, the package's
own PiSSA cannot stand in for the student's, and the solutions notebook's answers pass."""
from __future__ import annotations

import json

import pytest
import torch

import peft_lab
from builders import passes_and_leaves_the_rng_alone, verdict
from peft_lab.exercises.nb08 import _loraplus_rates
from peft_lab.paths import data_dir

SOLUTIONS = data_dir().parent / "notebooks" / "solutions" / "08_what_matters_solutions.ipynb"


def test_predicted_rate_within_a_factor_two():
    if not _loraplus_rates():
        ok, why = verdict("08.ex1", 1e-3)
        assert not ok and "no LoRA+ runs" in why
        pytest.skip("the committed results file has no LoRA+ runs (a stopped run): nothing to predict yet")
    lr = _loraplus_rates()["plus"]
    assert verdict("08.ex1", lr)[0] and verdict("08.ex1", 1.8 * lr)[0] and verdict("08.ex1", lr / 1.8)[0]
    ok, why = verdict("08.ex1", 3 * lr)
    assert not ok and "too high" in why and f"{lr:.2g}" not in why
    ok, why = verdict("08.ex1", lr / 3)
    assert not ok and "too low" in why


def _good(W, rank, s):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:rank] / s).sqrt()
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    return A, B, W - s * B @ A


def _no_scaling(W, rank, s):                     # forgets s: B A is the top-r part, s·B A is not
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B, A = U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]
    return A, B, W - s * B @ A


def _smallest(W, rank, s):                       # the minor singular triplets (MiLoRA's choice, not PiSSA's)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[-rank:] / s).sqrt()
    B, A = U[:, -rank:] * root, root[:, None] * Vh[-rank:]
    return A, B, W - s * B @ A


def _all_in_b(W, rank, s):                       # right product, unbalanced split
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return Vh[:rank], U[:, :rank] * (S[:rank] / s), W - (U[:, :rank] * S[:rank]) @ Vh[:rank]


def _no_residual(W, rank, s):
    A, B, _ = _good(W, rank, s)
    return A, B, W


def _stored(fn):
    """A d_out × d_in answer turned into one for a Conv1D weight, stored d_in × d_out (the exercise's input)."""
    def on_conv1d(W_stored, rank, s):
        A, B, res = fn(W_stored.T, rank, s)
        return A, B, res.T
    on_conv1d.__name__ = fn.__name__
    return on_conv1d


def _residual_not_stored(W_stored, rank, s):    # the residual left in the d_out × d_in view
    A, B, res = _good(W_stored.T, rank, s)
    return A, B, res


def test_pissa_build_right_and_wrong():
    assert passes_and_leaves_the_rng_alone("08.ex2", _stored(_good))
    for fn, words in ((_stored(_no_scaling), "divide the singular values by s"), (_stored(_smallest), "smallest"),
                      (_stored(_all_in_b), "split"), (_stored(_no_residual), "W_res + s·B A"),
                      (_good, "transpose it first"), (_residual_not_stored, "layer's layout")):
        ok, why = verdict("08.ex2", fn)
        assert not ok and words in why, (fn.__name__, why)


def test_the_package_pissa_is_not_an_answer():
    def via_package(W_stored, rank, s):
        return peft_lab.lora.pissa_factors(W_stored.T, rank, s)

    def via_layer(W_stored, rank, s):
        W = W_stored.T
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data.copy_(W)
        lora = peft_lab.LoRALinear(layer, rank=rank, alpha=s * rank, init="pissa")
        return lora.lora_A.weight, lora.lora_B.weight, layer.weight
    from peft_lab.exercises import StudentCodeError
    for fn in (via_package, via_layer):
        with pytest.raises(StudentCodeError, match="pissa_factors is what this exercise asks you to write"):
            verdict("08.ex2", fn)
    with pytest.raises(StudentCodeError, match="the package's own answer"):
        verdict("08.ex2", peft_lab.lora.pissa_factors)


def _buggy(model, lr, ratio, total_steps):
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    opt = torch.optim.AdamW([{"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}])
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)


def _fixed(model, lr, ratio, total_steps):
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    opt = torch.optim.AdamW([{"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}])
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * ratio], total_steps=total_steps)


def _peak_for_b(model, lr, ratio, total_steps):  # ratio kept, but A peaks at lr / ratio
    opt, _ = _fixed(model, lr, ratio, total_steps)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr / ratio, lr], total_steps=total_steps)


def _no_schedule(model, lr, ratio, total_steps):
    return _fixed(model, lr, ratio, total_steps)[0], None


def test_loraplus_debug_right_and_wrong():
    assert passes_and_leaves_the_rng_alone("08.ex3", _fixed)
    ok, why = verdict("08.ex3", _buggy)
    assert not ok and "the same" in why and "scheduler" in why
    ok, why = verdict("08.ex3", _peak_for_b)
    assert not ok and "peak" in why
    ok, why = verdict("08.ex3", _no_schedule)
    assert not ok and "scheduler" in why


@pytest.mark.parametrize("exercise_id", ["08.ex2", "08.ex3"])
def test_solutions_notebook_answers_pass(exercise_id, capsys):
    nb = json.loads(SOLUTIONS.read_text())
    source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
                       and f'"{exercise_id}"' in "".join(c["source"]))
    env = {"torch": torch, "peft_lab": peft_lab}
    exec(source, env)                               # defines the function and runs its check
    assert f"Right [{exercise_id}]" in capsys.readouterr().out


def test_solution_of_the_prediction_passes():
    if not _loraplus_rates():
        pytest.skip("the committed results file has no LoRA+ runs (a stopped run)")
    lora = _loraplus_rates()["lora"]
    assert verdict("08.ex1", lora / 4)[0]      # the solutions' reasoning: 16× on B, a geometric mean, lr / √16
