import math

import pytest
import torch

from peft_lab import collate, encode_task, evaluate_task, load_heldout, load_task, perplexity
from peft_lab.corpus import generate_corpus, generate_task, review_verdict
from peft_lab.data import SPLITS, build_task_files, unigram_perplexity
from peft_lab.paths import data_dir


def test_task_labels_follow_the_rule_and_are_balanced():
    rows = load_task("train")
    assert len(rows) == SPLITS["train"][0]
    assert all(review_verdict(r["prompt"]) == r["answer"] for r in rows)
    assert sum(r["answer"] == "good" for r in rows) == len(rows) // 2


def test_task_generation_is_deterministic_and_validated():
    assert generate_task(20, seed=5) == generate_task(20, seed=5)
    assert generate_task(20, seed=5) != generate_task(20, seed=6)
    with pytest.raises(ValueError, match="odd"):
        generate_task(10, seed=0, num_clauses=2)
    with pytest.raises(ValueError):
        generate_corpus(-1)
    with pytest.raises(ValueError, match="not a review clause"):
        review_verdict("review: the cat sat . verdict:")


def test_committed_data_is_what_the_generator_makes(tmp_path):
    build_task_files(tmp_path)
    for split in SPLITS:
        assert (tmp_path / "task" / f"{split}.jsonl").read_bytes() == \
            (data_dir() / "task" / f"{split}.jsonl").read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == (data_dir() / "heldout.jsonl").read_bytes()


def test_task_differs_from_pretraining_text_and_sizes_fit():
    assert not any("verdict:" in t for t in generate_corpus(2000, seed=0))
    assert set(load_heldout()).isdisjoint(r["prompt"] for r in load_task("test"))
    size = sum(p.stat().st_size for p in (data_dir() / "task").glob("*.jsonl"))
    assert size <= 1_000_000
    assert (data_dir() / "tiny" / "model.safetensors").stat().st_size <= 10_000_000


def test_bad_split_and_missing_files(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        load_task("dev")
    monkeypatch.setenv("PEFT_LAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m peft_lab.build_data"):
        load_task("train")
    monkeypatch.setenv("PEFT_LAB_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_task("train")


def test_encode_and_collate(tiny):
    _, tok = tiny
    ex = encode_task(load_task("val", n=3), tok)
    for e in ex:
        supervised = [t for t in e["labels"] if t != -100]
        assert supervised == e["input_ids"][-2:]          # answer token + EOS
        assert supervised[-1] == tok.eos_token_id
    batch = collate(ex, pad_id=tok.eos_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in ex)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(KeyError, match="prompt"):
        encode_task([{"text": "x"}], tok)
    with pytest.raises(TypeError, match="tokenizer"):
        encode_task(load_task("val", n=1), "not a tokenizer")


def test_evaluate_is_batched_deterministic_and_near_chance_zero_shot(tiny):
    model, tok = tiny
    rows = load_task("test", n=200)
    a = evaluate_task(model, tok, rows, batch_size=64)
    b = evaluate_task(model, tok, rows, batch_size=7)  # batching must not change predictions
    assert a["predictions"] == b["predictions"]
    assert 0.3 <= a["accuracy"] <= 0.7, a["accuracy"]  # the base model never saw the task
    with pytest.raises(ValueError):
        evaluate_task(model, tok, [])
    with pytest.raises(ValueError, match="one token"):
        evaluate_task(model, tok, rows, choices=("good", "splendiferous"))


def test_tiny_model_beats_unigram_on_heldout_slice(tiny):
    """The model card's quality claim, checked on a small slice so that it stays fast."""
    model, tok = tiny
    held = load_heldout(n=60)
    ppl = perplexity(model, tok, held)
    uni = unigram_perplexity(generate_corpus(5000, seed=0), held, tok)
    assert math.isfinite(ppl) and ppl < 0.4 * uni, (ppl, uni)
    with pytest.raises(ValueError):
        perplexity(model, tok, [])
