import pytest
import torch

from peft_lab import History, train
from peft_lab.corpus import generate_corpus


def lm_examples(n=64, length=24, vocab=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an easy pattern to memorise: 4 distinct sequences counting upward, repeated
    starts = torch.randint(0, vocab - length, (4,), generator=g).repeat(n // 4)
    return [{"input_ids": list(range(s, s + length)), "labels": list(range(s, s + length))}
            for s in starts.tolist()]


def test_loss_falls_and_history_is_complete(small_gpt2):
    calls = []
    hist = train(small_gpt2, lm_examples(), steps=40, batch_size=8, lr=3e-3,
                 eval_fn=lambda m: calls.append(1) or 0.5, eval_every=10)
    assert isinstance(hist, History)
    assert hist.step == list(range(1, 41)) and len(hist.loss) == len(hist.wall_time) == 40
    assert hist.eval_step == [0, 10, 20, 30, 40] and len(calls) == 5
    assert sum(hist.loss[-5:]) / 5 < 0.8 * sum(hist.loss[:5]) / 5
    assert hist.trainable_params == sum(p.numel() for p in small_gpt2.parameters())


def test_max_steps_variable_caps_every_run(small_gpt2, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_MAX_STEPS", "3")
    hist = train(small_gpt2, lm_examples(), steps=40, batch_size=8, eval_fn=lambda m: 0.5, eval_every=10)
    assert hist.step == [1, 2, 3] and hist.eval_step == [0, 3]
    monkeypatch.setenv("PEFT_LAB_MAX_STEPS", "three")
    with pytest.raises(ValueError, match="PEFT_LAB_MAX_STEPS"):
        train(small_gpt2, lm_examples(), steps=5, batch_size=8)


def test_same_seed_same_run(small_gpt2):
    state = {k: v.clone() for k, v in small_gpt2.state_dict().items()}
    a = train(small_gpt2, lm_examples(), steps=5, batch_size=4, seed=3)
    small_gpt2.load_state_dict(state)
    b = train(small_gpt2, lm_examples(), steps=5, batch_size=4, seed=3)
    assert a.loss == b.loss


def test_only_trainable_parameters_change(small_gpt2):
    for name, p in small_gpt2.named_parameters():
        p.requires_grad = "ln_f" in name
    frozen = {n: p.clone() for n, p in small_gpt2.named_parameters() if not p.requires_grad}
    before = small_gpt2.transformer.ln_f.weight.clone()
    hist = train(small_gpt2, lm_examples(), steps=3, batch_size=4, lr=1e-2)
    assert hist.trainable_params == 2 * 32
    assert all(torch.equal(p, frozen[n]) for n, p in small_gpt2.named_parameters() if n in frozen)
    assert not torch.equal(before, small_gpt2.transformer.ln_f.weight)


def test_bad_arguments(small_gpt2):
    ex = lm_examples(8)
    with pytest.raises(ValueError, match="steps"):
        train(small_gpt2, ex, steps=0)
    with pytest.raises(ValueError, match="at least one example"):
        train(small_gpt2, [], steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        train(small_gpt2, ex, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="schedule"):
        train(small_gpt2, ex, steps=1, schedule="linear")
    for p in small_gpt2.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(small_gpt2, ex, steps=1)


def test_corpus_is_varied():
    docs = generate_corpus(2000, seed=0)
    assert len(set(docs)) > 1900
    assert len({w for d in docs for w in d.split()}) > 200  # a lexicon of a few hundred words
