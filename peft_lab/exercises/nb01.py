"""Exercises of notebook 01 (base model and task). Expected answers are computed, not stored."""
from __future__ import annotations

from ..corpus import review_verdict
from . import exercise, number, run_student


@exercise("01.ex1", "Accuracy of a model that always answers 'good' on the test split (a fraction in [0, 1])?")
def _always_good(answer):
    from ..data import load_task
    rows = load_task("test")
    expected = sum(r["answer"] == "good" for r in rows) / len(rows)
    return number(answer, expected, rel_tol=1e-3,
                  mistakes={100 * expected: "give a fraction in [0, 1], not a percentage."},
                  explain=f"labels are balanced, so a constant answer scores {expected:.2f}: the chance "
                          "level any zero-shot result must be compared with.")


EXAMPLE_REVIEW = "review: the tea was not cold . the room was dirty . the guide was never rude . verdict:"


@exercise("01.ex2", f"What is the verdict of: {EXAMPLE_REVIEW!r}? Answer 'good' or 'bad'.")
def _verdict(answer):
    if not isinstance(answer, str):
        raise TypeError("answer with the string 'good' or 'bad'")
    expected = review_verdict(EXAMPLE_REVIEW)
    if answer.strip().lower() == expected:
        return True, "'not cold' and 'never rude' are positive, 'dirty' negative: 2 of 3 positive -> good."
    return False, "negators flip a clause: 'not cold' counts as positive. Count the positive clauses."


@exercise("01.ex3", "How many bytes does full fine-tuning of the tiny model with fp32 AdamW need for weights, "
                  "gradients and optimizer state together (activations excluded)?")
def _bytes(answer):
    from ..measure import count_parameters
    from ..models import build_from_config
    _, n = count_parameters(build_from_config("tiny", device="meta"))
    return number(answer, 16 * n, rel_tol=1e-3,
                  mistakes={4 * n: "that is the weights alone; add gradients (4 B) and two Adam moments (8 B).",
                            8 * n: "weights + gradients; AdamW also keeps two moments per parameter (8 B).",
                            12 * n: "you kept one Adam moment; AdamW keeps two (exp_avg and exp_avg_sq)."},
                  explain=f"{n:,} parameters x (4 weight + 4 gradient + 8 Adam) bytes = {16 * n:,} B.")


def _ids(x) -> list[int]:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"expected a list of token ids, got {type(x).__name__}")
    return [int(i) for i in x]


@exercise("01.ex4", "Write encode(example, tokenizer) returning {'input_ids': [...], 'labels': [...]} for one task "
                    "example {'prompt', 'answer'}: the prompt's tokens, then the answer as one token with its "
                    "leading space, then end-of-text; labels -100 over the prompt and equal to the ids after it. "
                    "Pass the function itself to check.")
def _encode(answer):
    from transformers import AutoTokenizer

    from ..data import encode_task, load_task
    from ..models import _tiny_dir

    if not callable(answer):
        raise TypeError("pass your function itself, e.g. check('01.ex4', encode)")
    tok = AutoTokenizer.from_pretrained(_tiny_dir(), local_files_only=True)
    examples = load_task("val", n=20) + [{"prompt": EXAMPLE_REVIEW, "answer": "good"}]
    for ex in examples:
        want = encode_task([ex], tok)[0]
        got = run_student(answer, dict(ex), tok)
        if not isinstance(got, dict) or not {"input_ids", "labels"} <= set(got):
            return False, "return a dict with the keys 'input_ids' and 'labels'."
        ids, labels = _ids(got["input_ids"]), _ids(got["labels"])
        n_prompt = len(tok.encode(ex["prompt"]))
        if ids != want["input_ids"]:
            if ids == want["input_ids"][:-1]:
                return False, "the sequence must end with the end-of-text token (tokenizer.eos_token_id)."
            if ids[:n_prompt] == want["input_ids"][:n_prompt] and tok.decode(ids[n_prompt:]).startswith(ex["answer"]):
                return False, (f"the answer is tokenised with its leading space (' {ex['answer']}', one token), as "
                               "it follows 'verdict:' in running text.")
            return False, f"input_ids differ for {ex['prompt']!r}: expected {want['input_ids']}, got {ids}."
        if labels != want["labels"]:
            if labels == ids:
                return False, "the prompt is context, not a target: its labels must be -100 (ignored by the loss)."
            if len(labels) != len(ids):
                return False, "labels must have one entry per input id (the model shifts them itself)."
            return False, f"labels differ for {ex['prompt']!r}: expected {want['labels']}, got {labels}."
    return True, (f"equal to peft_lab.encode_task on {len(examples)} examples: only the answer and end-of-text "
                  "are supervised.")
