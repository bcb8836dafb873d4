"""Notebook 06's code exercises: a right answer passes, each typical wrong one fails with its reason."""
from __future__ import annotations

import re

import pytest

import peft_lab
from builders import verdict
from peft_lab import compare

# --- 06.ex1: IA3's trainable parameters ----------------------------------------------------------------------

def _shape(c):
    if c.model_type == "gpt2":
        return c.n_layer, c.n_embd, c.n_embd, c.n_inner or 4 * c.n_embd
    kv = c.num_key_value_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers, c.hidden_size, kv, c.intermediate_size


def ia3_right(c):
    L, d, kv, ff = _shape(c)
    return L * (3 * d + ff) if c.model_type == "gpt2" else L * (2 * kv + ff)


def ia3_keys_values_only(c):             # the old table's "keys, values" on GPT-2
    L, d, kv, ff = _shape(c)
    return L * (2 * d + ff) if c.model_type == "gpt2" else ia3_right(c)


def ia3_four_d(c):                       # assumes GPT-2's MLP is always 4·d wide
    L, d, _, _ = _shape(c)
    return L * (3 * d + 4 * d) if c.model_type == "gpt2" else ia3_right(c)


def ia3_with_queries(c):                 # q_proj scaled on LLaMA too
    L, d, kv, ff = _shape(c)
    return ia3_right(c) if c.model_type == "gpt2" else L * (d + 2 * kv + ff)


def ia3_no_gqa(c):                       # k, v as wide as the hidden state
    L, d, _, ff = _shape(c)
    return ia3_right(c) if c.model_type == "gpt2" else L * (2 * d + ff)


def ia3_down_output(c):                  # scales down_proj's output instead of its input
    L, d, kv, _ = _shape(c)
    return ia3_right(c) if c.model_type == "gpt2" else L * (2 * kv + d)


def test_ia3_right_answer_passes():
    assert peft_lab.check("06.ex1", ia3_right, verbose=False)


@pytest.mark.parametrize("wrong, words", [
    (ia3_keys_values_only, "queries, keys and values"), (ia3_four_d, "n_inner"), (ia3_with_queries, "not q_proj"),
    (ia3_no_gqa, "grouped-query"), (ia3_down_output, "input of down_proj"),
    (lambda c: None, "returns nothing"), (lambda c: c.n_embd * 0, "PEFT's IA3 trains"),
])
def test_ia3_wrong_answers_fail_with_their_reason(wrong, words):
    ok, why = verdict("06.ex1", wrong)
    assert not ok and words in why, why


def test_ia3_crash_and_non_function_are_readable(capsys):
    ok, why = verdict("06.ex1", lambda c: c.no_such_field)
    assert not ok and "AttributeError" in why
    assert peft_lab.check("06.ex1", 3584) is False
    assert "answer is code: pass your function or class itself" in " ".join(capsys.readouterr().out.split())


# --- 06.ex2: the largest batch in a memory budget ------------------------------------------------------------

def fits(size, method, precision, seq_len, budget_gib, batch, per=2**30):
    total = compare.calculator(method, size, batch_size=batch, seq_len=seq_len, precision=precision)["total"]
    return total <= budget_gib * per


def batch_right(size, method, precision, seq_len, budget_gib, per=2**30):
    b = 0
    while fits(size, method, precision, seq_len, budget_gib, b + 1, per):
        b += 1
    return b


def batch_off_by_one(*args):             # the first batch that does not fit
    return batch_right(*args) + 1


def batch_gigabytes(*args):              # 10**9 bytes per "GiB"
    return batch_right(*args, per=10**9)


def batch_at_least_one(*args):
    return max(1, batch_right(*args))


def batch_fp32_always(size, method, precision, seq_len, budget_gib):
    return batch_right(size, method, "fp32" if precision != "4bit-base" else precision, seq_len, budget_gib)


def test_budget_right_answer_passes():
    ok, why = verdict("06.ex2", batch_right)
    assert ok, why
    assert re.search(r"trains \d+ sequences of 512 tokens per step in bf16, \d+ with the base in 4 bits", why), why


@pytest.mark.parametrize("wrong, words", [
    (batch_off_by_one, "Off by one"), (batch_gigabytes, "2**30"), (batch_at_least_one, "Return 0"),
    (batch_fp32_always, "fits too"), (lambda *a: 2.5, "whole number"), (lambda *a: None, "returns nothing"),
])
def test_budget_wrong_answers_fail_with_their_reason(wrong, words):
    ok, why = verdict("06.ex2", wrong)
    assert not ok and words in why, why
