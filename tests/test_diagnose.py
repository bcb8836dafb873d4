"""peft_lab.diagnose: the plateau's numbers (notebook 04 §5.1) and the linear probe (§5.3), against independent
computations."""
from __future__ import annotations

import math

import pytest
import torch

import peft_lab
from peft_lab import diagnose
from peft_lab.tolerance import assert_close


@pytest.fixture(scope="module")
def tiny():
    return peft_lab.load_base_model("tiny", device="cpu")


def test_answer_diagnostics_match_evaluate_task_and_a_hand_computed_loss(tiny):
    base, tok = tiny
    rows = peft_lab.load_task("val", n=24)
    torch.manual_seed(3)
    model = peft_lab.apply_prefix_tuning(base, 4)        # a random prefix: answers that vary with the input
    d = diagnose.answer_diagnostics(model, tok, rows, batch_size=7)
    ev = peft_lab.evaluate_task(model, tok, rows)
    assert d["accuracy"] == ev["accuracy"]
    assert d["said_good"] == sum(p == "good" for p in ev["predictions"]) / len(rows)
    # the answer token's loss of row 0, one example alone (no padding)
    ids = tok.encode(rows[0]["prompt"])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    good, bad = tok.encode(" good")[0], tok.encode(" bad")[0]
    alone = diagnose.answer_diagnostics(model, tok, rows[:1])
    answer = good if rows[0]["answer"] == "good" else bad
    assert_close(torch.tensor(alone["answer_loss"]), -logp[answer], reason="batched vs one row: reordered sums")
    assert_close(torch.tensor(alone["spread_mean"]), logp[good] - logp[bad], reason="log-softmax shift cancels")
    two_way = logp[[good, bad]].log_softmax(-1)[0 if rows[0]["answer"] == "good" else 1]
    assert_close(torch.tensor(alone["choice_loss"]), -two_way, reason="softplus vs log-softmax: reordered")
    peft_lab.remove_prefix(model)


def test_linear_probe_reads_a_separable_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = x[:, 3] + 0.5 * x[:, 7] > 0
    assert diagnose.linear_probe(x[:200], y[:200], x[200:], y[200:]) >= 0.95
    noise = torch.rand(300, generator=g) > 0.5
    assert abs(diagnose.linear_probe(x[:200], noise[:200], x[200:], noise[200:]) - 0.5) < 0.2


def test_verdict_hidden_states_are_each_prompts_last_token(tiny):
    base, tok = tiny
    rows = peft_lab.load_task("val", n=5)
    h = diagnose.verdict_hidden_states(base, tok, rows, batch_size=3)
    assert h.shape == (base.config.n_layer + 1, 5, base.config.n_embd)
    with torch.no_grad():
        alone = base(input_ids=torch.tensor([tok.encode(rows[4]["prompt"])]), output_hidden_states=True).hidden_states
    assert_close(h[:, 4], torch.stack([s[0, -1] for s in alone]), reason="padded batch vs one row: reordered")


def test_attention_io_returns_the_block_input_and_output(tiny):
    base, tok = tiny
    ids = torch.tensor([tok.encode("review: the soup was cold . verdict:")])
    seen = diagnose.attention_io(base, 1, input_ids=ids)
    with torch.no_grad():
        hs = base(input_ids=ids, output_hidden_states=True).hidden_states
    attn_in = peft_lab.arch.blocks(base)[1].ln_1(hs[1])             # GPT-2: attention reads ln_1 of the stream
    assert_close(seen["x"], attn_in, reason="same ops, separate calls")
    assert seen["out"].shape == ids.shape + (base.config.n_embd,) and seen["rope"] is None
    assert math.isfinite(seen["out"].abs().max().item())
