"""Notebook 04's code exercise 04.ex5 (a prefix initialised from a text, built by the student): the right
answer passes on GPT-2 and on a RoPE/GQA model, and each kind of wrong answer is refused with its reason."""
from __future__ import annotations

import pytest
import torch

import peft_lab


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
    assert reason in capsys.readouterr().out


def test_text_prefix_not_a_function(capsys):
    assert not peft_lab.check("04.ex5", 3)
    assert "expected a function" in capsys.readouterr().out
