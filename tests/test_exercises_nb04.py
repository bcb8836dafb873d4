"""Notebook 04's code exercise 04.ex5 (a prefix initialised from a text, built by the student): the right
answer passes on GPT-2 and on a RoPE/GQA model, and each kind of wrong answer is refused with its reason."""
from __future__ import annotations

import pytest
import torch

import peft_lab
from builders import verdict


def _cache(out):  # transformers 5.2x names the output's cache `cache`, earlier versions `past_key_values`
    return out["cache"] if "cache" in out else out["past_key_values"]

def good(model, ids):
    model.eval()
    with torch.no_grad():
        cache = _cache(model(input_ids=ids[None], use_cache=True))
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])   # 2L x h_kv x P x d_h
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1)


def values_first(model, ids):
    with torch.no_grad():
        cache = _cache(model(input_ids=ids[None], use_cache=True))
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.values, layer.keys)])
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1)


def no_permute(model, ids):          # right numbers, per-layer tensors flattened in the wrong order
    with torch.no_grad():
        cache = _cache(model(input_ids=ids[None], use_cache=True))
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])
    return kv.reshape(ids.numel(), -1)


def embeddings(model, ids):          # prompt tuning's text init repeated as keys and values: not the cache
    s = peft_lab.prefix.prefix_shapes(model.config)
    e = model.get_input_embeddings()(ids)[:, :s["kv_dim"]]
    return e.repeat(1, 2 * s["num_layers"])


def full_width(model, ids):          # keys/values repeated to every query head: right on GPT-2, not under GQA
    model.eval()
    s = peft_lab.prefix.prefix_shapes(model.config)
    with torch.no_grad():
        cache = _cache(model(input_ids=ids[None], use_cache=True))
    group = s["num_heads"] // s["num_kv_heads"]
    kv = torch.stack([t[0].repeat_interleave(group, 0) for layer in cache.layers for t in (layer.keys, layer.values)])
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1)


def test_text_prefix_right():
    assert peft_lab.check("04.ex5", good)


@pytest.mark.parametrize("wrong, reason", [(values_first, "swapped"), (no_permute, "wrong places"),
                                           (embeddings, "does not read X"), (full_width, "grouped-query")])
def test_text_prefix_wrong(wrong, reason, capsys):
    assert not peft_lab.check("04.ex5", wrong)
    assert reason in " ".join(capsys.readouterr().out.split())


def test_text_prefix_not_a_function(capsys):
    assert not peft_lab.check("04.ex5", 3)
    assert "answer is code: pass your function or class itself" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------------------
# 04.ex1 (build), 04.ex2 (predict), 04.ex3 (debug), 04.ex4 (compute)
# ---------------------------------------------------------------------------------------------------------

def count(config, p):
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * p * kv * head_dim


def test_prefix_count_right_and_wrong(capsys):
    assert peft_lab.check("04.ex1", count)
    assert not peft_lab.check("04.ex1", lambda c, p: c.num_hidden_layers * 2 * p * c.hidden_size)
    assert "grouped-query" in " ".join(capsys.readouterr().out.split())
    assert not peft_lab.check("04.ex1", lambda c, p: count(c, p) // 2)
    assert "Keys AND values" in " ".join(capsys.readouterr().out.split())


def test_activation_prediction():
    from peft_lab.exercises.nb04 import PREDICT_P, _activation_ratio
    prompt, prefix, ratio = _activation_ratio(PREDICT_P)
    assert 1.5 < ratio < (29 + PREDICT_P) / 29          # prompt tuning needs more, a little less than (T + P) / T
    ok, why = verdict("04.ex2", (29 + PREDICT_P) / 29)  # the first guess is within the stated 10%
    assert ok and "measured" in why
    ok, why = verdict("04.ex2", 1.0)
    assert not ok and "activations, not parameters" in why and f"{ratio:.2f}" not in why
    ok, why = verdict("04.ex2", 0.5)
    assert not ok and "not fewer" in why
    ok, why = verdict("04.ex2", 3.0)
    assert not ok and "Try again" in why and f"{ratio:.2f}" not in why   # a hint, not the measurement


def broken_prefix_logits(model, table, input_ids, attention_mask, fix=False):
    from transformers import DynamicCache

    from peft_lab.prefix import cache_argument, prefix_shapes
    s = prefix_shapes(model.config)
    B, P, L = input_ids.shape[0], table.shape[0], s["num_layers"]
    kv = table.expand(B, -1, -1).view(B, P, 2 * L, s["num_kv_heads"], s["head_dim"]).permute(2, 0, 3, 1, 4)
    cache = DynamicCache()
    for layer in range(L):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    if fix:
        attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
    return model(input_ids=input_ids, attention_mask=attention_mask, **{cache_argument(model): cache}).logits


def test_debug_mask():
    ok, why = verdict("04.ex3", broken_prefix_logits)
    assert not ok and "P + T positions" in why
    assert verdict("04.ex3", lambda *a: broken_prefix_logits(*a, fix=True))[0]
    ok, why = verdict("04.ex3", lambda *a: broken_prefix_logits(*a, fix=True)[:, :-1])
    assert not ok and "shape" in why


def test_positions_give_hints_not_the_answer():
    assert verdict("04.ex4", 1004)[0]
    ok, why = verdict("04.ex4", 1024)
    assert not ok and "start at P" in why
    ok, why = verdict("04.ex4", 1000)
    assert not ok and "too low" in why and "1004" not in why and "1,004" not in why
