"""Task data: load the JSONL files, tokenize, batch, and score (notebook 01, "The task").

Examples are ``{"prompt": "review: ... verdict:", "answer": "good"}``. For training, the prompt is context
(label -100) and only the answer token plus the end-of-text token are supervised. For evaluation the model
chooses between the candidate answers by their next-token logit, so accuracy has a clear chance level.

``python -m peft_lab.build_data`` rewrites ``data/task/*.jsonl`` and ``data/heldout.jsonl`` from their seeds.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from . import core, validate
from .corpus import VERDICTS, generate_corpus, generate_task
from .paths import atomic_path, data_dir

SPLITS = {"train": (3000, 1), "val": (300, 2), "test": (500, 3)}  # size, seed
HELDOUT = (400, 10_001)  # pretraining-style documents the base model never saw: size, seed


def load_jsonl(path: str | Path) -> list[dict]:
    path = validate.require_path("path", path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: {path}. Rebuild the task data with `python -m peft_lab.build_data`, "
            "or set PEFT_LAB_DATA to the repository's data/ folder."
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One JSON object per line, written atomically (a failed write leaves the old file)."""
    path = validate.require_path("path", path)
    lines = [json.dumps(row, sort_keys=True) + "\n" for row in rows]  # fail before touching the file
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines)


def load_task(split: str = "train", n: int | None = None) -> list[dict]:
    """Raw examples of the review task: ``split`` in train/val/test, optionally only the first ``n``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    n = validate.optional(validate.require_int, "n", n, min=0)
    rows = load_jsonl(data_dir() / "task" / f"{split}.jsonl")
    return _first(rows, n, f"the {split!r} split")


def load_heldout(n: int | None = None) -> list[str]:
    """Held-out pretraining-style documents, to measure perplexity and forgetting."""
    n = validate.optional(validate.require_int, "n", n, min=0)
    rows = load_jsonl(data_dir() / "heldout.jsonl")
    return [r["text"] for r in _first(rows, n, "the held-out documents")]


def _first(rows: list, n: int | None, what: str) -> list:
    """The first ``n`` rows; asking for more than exist is an error, not a silently shorter list."""
    if n is not None and n > len(rows):
        raise ValueError(f"n={n} but {what} has only {len(rows)} rows; pass n <= {len(rows)} or n=None for all")
    return rows if n is None else rows[:n]


def _check_tokenizer(tokenizer) -> None:
    validate.require_tokenizer("tokenizer", tokenizer)


def encode_task(examples: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels for causal-LM training: prompt masked with -100, answer + EOS supervised."""
    examples = validate.require_task_rows("examples", examples, nonempty=False)
    _check_tokenizer(tokenizer)
    out = []
    for ex in examples:
        p = tokenizer.encode(ex["prompt"])
        a = tokenizer.encode(" " + ex["answer"]) + [tokenizer.eos_token_id]
        out.append({"input_ids": p + a, "labels": [validate.IGNORE_INDEX] * len(p) + a})
    return out


def encode_texts(texts: list[str], tokenizer, max_length: int | None = None) -> list[dict]:
    """Plain language-modelling examples (every token supervised), each ending in EOS."""
    texts = validate.require_texts("texts", texts, nonempty=False)
    _check_tokenizer(tokenizer)
    max_length = validate.optional(validate.require_int, "max_length", max_length, min=1)
    out = []
    for ids in tokenizer(texts)["input_ids"] if texts else []:  # one batched call: fast tokenizers
        ids = (ids + [tokenizer.eos_token_id])[:max_length]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def collate(examples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` to a batch with an attention mask."""
    if isinstance(examples, (list, tuple)) and len(examples) == 0:
        raise ValueError("cannot collate an empty batch: examples is empty")
    examples = validate.require_encoded_examples("examples", examples)
    pad_id = validate.require_int("pad_id", pad_id, min=0)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), validate.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_task(model, tokenizer, examples: list[dict], batch_size: int = 64,
                  choices: tuple[str, ...] = VERDICTS) -> dict:
    """Accuracy of choosing the right answer among ``choices`` by next-token logit after the prompt.

    Batched and deterministic (eval mode, no sampling). Prompts are left-aligned; we read the logit at each
    row's last real token. Returns ``{"accuracy", "n", "predictions"}``.
    """
    model = validate.require_module("model", model)
    _check_tokenizer(tokenizer)
    if isinstance(examples, (list, tuple)) and len(examples) == 0:
        raise ValueError("evaluate_task needs at least one example (examples is empty)")
    examples = validate.require_task_rows("examples", examples)
    batch_size = validate.require_int("batch_size", batch_size, min=1)
    choices = tuple(validate.require_texts("choices", choices))
    choice_ids = [tokenizer.encode(" " + c) for c in choices]
    if any(len(c) != 1 for c in choice_ids):
        raise ValueError(f"each choice must be one token, got {dict(zip(choices, choice_ids))}")
    vocab, context = validate.model_limits(model)
    if vocab is not None and any(c[0] >= vocab for c in choice_ids):
        raise ValueError(f"the choices' token ids {dict(zip(choices, choice_ids))} are outside the model's "
                         f"vocabulary [0, {vocab}); do the model and the tokenizer belong together?")
    choice_ids = torch.tensor([c[0] for c in choice_ids])
    # Encode and check every prompt before the model runs: a bad one fails here, not midway.
    encoded = validate.require_encoded_examples(
        "examples", [{"input_ids": tokenizer.encode(e["prompt"])} for e in examples],
        vocab_size=vocab, context=context)
    device = _device_of(model)
    preds: list[str] = []
    with core.eval_mode(model):
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i:i + batch_size], pad_id=tokenizer.eos_token_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            last = batch["attention_mask"].sum(1) - 1
            scores = logits[torch.arange(len(last)), last.to(device)][:, choice_ids.to(device)]
            preds += [choices[j] for j in scores.argmax(-1).tolist()]
    correct = sum(p == e["answer"] for p, e in zip(preds, examples))
    return {"accuracy": correct / len(examples), "n": len(examples), "predictions": preds}


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Token-level perplexity exp(mean NLL) of ``texts`` (each followed by EOS), padding excluded."""
    model = validate.require_module("model", model)
    if isinstance(texts, (list, tuple)) and len(texts) == 0:
        raise ValueError("perplexity needs at least one text (texts is empty)")
    texts = validate.require_texts("texts", texts)
    _check_tokenizer(tokenizer)
    batch_size = validate.require_int("batch_size", batch_size, min=1)
    vocab, context = validate.model_limits(model)
    enc = validate.require_encoded_examples("texts", encode_texts(texts, tokenizer), vocab_size=vocab, context=context)
    if all(len(e["input_ids"]) < 2 for e in enc):  # the first token of a text is never a target
        raise ValueError("texts hold nothing to score: every text is empty (only its end-of-text token)")
    device = _device_of(model)
    nll, count = 0.0, 0
    with core.eval_mode(model):
        for i in range(0, len(enc), batch_size):
            b = collate(enc[i:i + batch_size], pad_id=tokenizer.eos_token_id)
            logits = model(input_ids=b["input_ids"].to(device),
                           attention_mask=b["attention_mask"].to(device)).logits.float()
            targets = b["labels"][:, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            valid = targets != validate.IGNORE_INDEX
            tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= tok[valid].sum().item()
            count += int(valid.sum())
    return math.exp(nll / count)


def unigram_perplexity(train_texts: list[str], eval_texts: list[str], tokenizer) -> float:
    """Perplexity of an add-one-smoothed unigram model over the same tokens (the baseline to beat).

    Counts every token after the first of each text (the positions a causal LM is scored on), so the two
    figures are over the same targets.
    """
    counts = Counter()
    for e in encode_texts(train_texts, tokenizer):
        counts.update(e["input_ids"][1:])
    total, vocab = sum(counts.values()), len(tokenizer)
    nll, n = 0.0, 0
    for e in encode_texts(eval_texts, tokenizer):
        for t in e["input_ids"][1:]:
            nll -= math.log((counts[t] + 1) / (total + vocab))
            n += 1
    return math.exp(nll / n)


def build_task_files(out: Path | None = None) -> dict[str, int]:
    """Regenerate the task splits and the held-out documents deterministically."""
    out = Path(out) if out is not None else data_dir()
    sizes = {}
    for split, (n, seed) in SPLITS.items():
        write_jsonl(generate_task(n, seed), out / "task" / f"{split}.jsonl")
        sizes[split] = n
    n, seed = HELDOUT
    write_jsonl([{"text": t} for t in generate_corpus(n, seed)], out / "heldout.jsonl")
    sizes["heldout"] = n
    return sizes
