"""Notebook 05's exercises (beyond LoRA): a right answer passes, and each plausible wrong one is refused with a
reason that helps — never with the worked answer."""
from __future__ import annotations

import copy

import pytest
import torch

import peft_lab
from builders import verdict
from peft_lab import qlora
from peft_lab.exercises import exercises
from peft_lab.exercises.nb05 import BUGGY_DEPLOY, qlora_base_ratio
from peft_lab.lora import magnitude_direction_change

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_exercise_says_its_kind_and_hidden_forms():
    kinds = {e.id: e.kind for e in exercises("05")}
    assert kinds == {"05.ex1": "predict", "05.ex2": "build", "05.ex3": "debug", "05.ex4": "compute"}
    assert all(e.hidden is not None for e in exercises("05"))


# 05.ex1 (predict): the QLoRA base of gpt2-small against fp32 -------------------------------------------------

def test_predict_ratio_is_the_stored_bytes_of_section_3():
    ratio, share = qlora_base_ratio("gpt2")
    assert 3.9 < ratio < 4.3 and 0.6 < share < 0.75     # §3 measures 4.1x from the stored tensors


@pytest.mark.parametrize("answer", [4.1, 4.0, 3.8])
def test_predict_ratio_accepts_a_prediction_within_ten_percent(answer):
    ok, why = verdict("05.ex1", answer)
    assert ok and "measures" in why


@pytest.mark.parametrize("answer, words", [(7.75, "every"), (8, "4-bit indices"), (2, "bf16"), (0.25, "smaller"),
                                           (3.0, "too low"), (6.0, "too high")])
def test_predict_ratio_refuses_with_a_hint_not_the_answer(answer, words):
    ok, why = verdict("05.ex1", answer)
    assert not ok and words in why
    assert f"{qlora_base_ratio('gpt2')[0]:.2f}" not in why


# 05.ex2 (build): ΔM, ΔD -----------------------------------------------------------------------------------------

def _layout(w0, w, fan_in_fan_out):
    return (w0.T, w.T) if fan_in_fan_out else (w0, w)


def signed_m(w0, w, fan_in_fan_out=False):
    a, b = _layout(w0, w, fan_in_fan_out)
    return (b.norm(dim=1) - a.norm(dim=1)).mean().item(), magnitude_direction_change(w0, w, fan_in_fan_out)[1]


def cosine_not_distance(w0, w, fan_in_fan_out=False):
    a, b = _layout(w0, w, fan_in_fan_out)
    return (magnitude_direction_change(w0, w, fan_in_fan_out)[0],
            torch.nn.functional.cosine_similarity(b, a, dim=1).mean().item())


def ignores_layout(w0, w, fan_in_fan_out=False):
    return magnitude_direction_change(w0, w, False)


def columns(w0, w, fan_in_fan_out=False):
    return magnitude_direction_change(w0, w, not fan_in_fan_out)


def by_hand(w0, w, fan_in_fan_out=False):
    """§5's definition written out: per output feature, |Δ‖row‖| and 1 − cos, averaged."""
    a, b = (w0.T, w.T) if fan_in_fan_out else (w0, w)
    a, b = a.double(), b.double()
    dm = (b.norm(dim=1) - a.norm(dim=1)).abs().mean().item()
    dd = (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    return dm, dd


def test_build_accepts_the_definition():
    assert verdict("05.ex2", by_hand)[0]


@pytest.mark.parametrize("fn, words", [(signed_m, "absolute"), (cosine_not_distance, "1 − cos"),
                                       (ignores_layout, "wrong dimension"), (columns, "wrong dimension"),
                                       (lambda w0, w, fan_in_fan_out=False: 1.0, "two numbers")])
def test_build_names_the_mistake(fn, words):
    ok, why = verdict("05.ex2", fn)
    assert not ok and words in why


# 05.ex3 (debug): merge, then quantize again -----------------------------------------------------------------------

def _deploy(source):
    namespace = {"peft_lab": peft_lab, "copy": copy, "qlora": qlora}
    exec(source, namespace)
    return namespace["deploy"]


def test_debug_refuses_the_buggy_snippet_and_says_why():
    ok, why = verdict("05.ex3", _deploy(BUGGY_DEPLOY))
    assert not ok and "NF4 again" in why


def test_debug_accepts_the_float_merge():
    fixed = BUGGY_DEPLOY.replace("return qlora.quantize_model(model)", "return model")
    ok, why = verdict("05.ex3", _deploy(fixed))
    assert ok and "float" in why


def test_debug_refuses_an_unmerged_adapter_and_a_lost_update():
    ok, why = verdict("05.ex3", lambda m: m)
    assert not ok and "LoRA layers still compute" in why
    dropped = BUGGY_DEPLOY.replace("merge=True", "merge=False").replace("return qlora.quantize_model(model)",
                                                                      "return model")
    ok, why = verdict("05.ex3", _deploy(dropped))
    assert not ok and "outputs moved" in why


# 05.ex4 (compute): bits per weight ------------------------------------------------------------------------------

def test_bits_accepts_four_decimals():
    assert verdict("05.ex4", 4 + 8 / 128 + 32 / (128 * 256))[0]
    assert verdict("05.ex4", 4.0635)[0]


@pytest.mark.parametrize("answer, words", [(4.063, "four"), (4.0625, "second level"), (4.127, "blocks of 64"),
                                           (4.25, "without double"), (4.0, "indices alone"), (4.3, "too high")])
def test_bits_refuses_with_a_reason_and_no_worked_answer(answer, words):
    ok, why = verdict("05.ex4", answer)
    assert not ok and words in why and "4.0635" not in why


def test_the_package_function_is_not_an_answer_to_05_ex2():
    """05.ex2 asks to build ΔM/ΔD: peft_lab's own magnitude_direction_change refuses while the grader runs."""
    import peft_lab
    from peft_lab.exercises import StudentCodeError
    with pytest.raises(StudentCodeError, match="what this exercise asks you to write"):
        verdict("05.ex2", lambda w0, w, fan_in_fan_out=False: peft_lab.lora.magnitude_direction_change(
            w0, w, fan_in_fan_out=fan_in_fan_out))
