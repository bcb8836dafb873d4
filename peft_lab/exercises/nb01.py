"""Exercises of notebook 01 (base model and task). Expected answers are computed, not stored.

Each asks for something the notebook never prints: a shortcut's accuracy, verdicts with negations, the bytes of
another model in another precision with another method, an encoder run on examples the notebook never shows.
"""
from __future__ import annotations

from functools import lru_cache

from ..corpus import review_verdict
from . import exercise, run_student
from .hinted import hinted


def _first_clause_verdict(prompt: str) -> str:
    first = prompt.removeprefix("review: ").split(" . ")[0]
    return review_verdict(f"review: {first} . verdict:")


@lru_cache(maxsize=None)
def _first_clause_accuracy(n: int | None = None) -> float:
    from ..data import load_task
    rows = load_task("test")[:n]
    return sum(_first_clause_verdict(r["prompt"]) == r["answer"] for r in rows) / len(rows)


@exercise("01.ex1", "A shortcut model reads only the FIRST clause of a review and answers its polarity ('the tea "
                    "was cold . …' -> bad). What accuracy does it get on the whole test split "
                    "(peft_lab.load_task('test'), 500 reviews)? A percentage, one decimal (±0.2 points).",
          kind="compute", hidden=lambda: [f"{_first_clause_accuracy():.1%}", f"{100 * _first_clause_accuracy():.1f} %"])
def _first_clause(answer):
    expected = 100 * _first_clause_accuracy()
    on_300 = 100 * _first_clause_accuracy(300)
    return hinted(answer, expected, rel_tol=0.2 / expected, unit=" %",
                  mistakes={expected / 100: "give a percentage (e.g. 61.2), not a fraction.",
                            on_300: "that is the first 300 test reviews (the zero-shot cell's slice); the question "
                                    "means all 500 of the test split.",
                            50.0: "50% is a constant answer's score; the first clause carries information.",
                            75.0: "75% is what independent, balanced clauses would give in theory; the question asks "
                                  "for the measured accuracy on this split — compute it."},
                  hint="Split each prompt at ' . ', judge the first clause with the lexicon "
                       "(peft_lab.corpus.POSITIVE / NEGATIVE, or corpus.review_verdict on a one-clause review), "
                       "and compare with the label over all 500 reviews.",
                  explain=f"{expected:.1f}%: the first clause agrees with the majority of three whenever at least one "
                          "of the other two agrees with it — 3 of the 4 equally likely cases for independent, "
                          "balanced clauses, so about 75%. A model can score far above chance without doing the "
                          "task: compare accuracies with such shortcuts, not only with 50%.")


EXAMPLE_REVIEW = "review: the tea was not cold . the room was dirty . the guide was never rude . verdict:"

#: reviews with negators (the harder variant's grammar); the notebook's task has none
NEGATED_REVIEWS = [
    "review: the soup was never bland . the bed was not clean . the staff was not kind . verdict:",
    "review: the tea was not cold . the room was dirty . the guide was never rude . verdict:",
    "review: the show was not dull . the price was never cheap . the view was lovely . verdict:",
    "review: the coffee was never warm . the hall was not noisy . the bus was slow . verdict:",
]


@exercise("01.ex2", "In the harder variant with negations ('not'/'never' flip a clause), give the verdicts of the "
                    "four reviews in peft_lab.exercises.nb01.NEGATED_REVIEWS, in order, as a list of 'good'/'bad'.",
          kind="compute", hidden=lambda: [str([review_verdict(r) for r in NEGATED_REVIEWS])])
def _verdicts(answer):
    if isinstance(answer, str):
        raise TypeError("answer with a list of four strings, e.g. ['good', 'bad', 'bad', 'good']")
    if not isinstance(answer, (list, tuple)) or len(answer) != len(NEGATED_REVIEWS):
        raise TypeError(f"answer with a list of {len(NEGATED_REVIEWS)} verdicts, one per review")
    got = [str(a).strip().lower() for a in answer]
    wrong = [i for i, (g, r) in enumerate(zip(got, NEGATED_REVIEWS)) if g != review_verdict(r)]
    if not wrong:
        return True, ("each negator flips its clause's polarity, then the majority of three decides — the rule "
                      "corpus.review_verdict encodes.")
    return False, (f"{len(wrong)} of the {len(NEGATED_REVIEWS)} verdicts disagree with the rule (which ones is "
                   "left to you: with two labels, naming them would give the answer). Judge each clause by its "
                   "adjective, flip it if 'not' or 'never' is in the clause, then take the majority.")


@lru_cache(maxsize=None)
def _tiny_llama_lora_bytes() -> tuple[int, int, int]:
    """``(bytes, trainable, all)`` of tiny-llama's model states in bf16-mixed with LoRA r=8 on its defaults."""
    from ..estimate import PRECISIONS
    from ..lora import apply_lora
    from ..measure import count_parameters
    from ..models import build_from_config
    t, a = count_parameters(apply_lora(build_from_config("tiny-llama", device="meta"), rank=8))
    b = PRECISIONS["bf16-mixed"]
    return b["weight"] * a + (b["master"] + b["grad"] + b["adam"]) * t, t, a


@exercise("01.ex3", "How many bytes do weights, gradients and AdamW state take when the LLaMA twin tiny-llama is "
                    "trained in bf16 mixed precision (notebook 00, eq. (3)) with its base frozen and LoRA of rank "
                    "r = 8 on its default targets, q_proj and v_proj (each gets an r x in and an out x r matrix)? "
                    "Exact, in bytes.",
          kind="compute", hidden=lambda: [f"{_tiny_llama_lora_bytes()[0]:,}", str(_tiny_llama_lora_bytes()[0])])
def _bytes(answer):
    expected, t, a = _tiny_llama_lora_bytes()
    base = a - t
    square_v = 4 * 8 * (128 + 128) * 2          # v_proj taken as 128 -> 128 (no grouped-query attention)
    return hinted(answer, expected, rel_tol=1e-6, unit=" B",
                  mistakes={16 * a: "that is full fine-tuning: the frozen base keeps only its bf16 weights.",
                            4 * base + 16 * t: "a frozen weight in bf16 costs 2 B, not 4 (the base is stored in bf16).",
                            2 * base + 14 * t: "the LoRA weights themselves: 2 B (bf16) + 4 B master + 2 B gradient "
                                               "+ 8 B Adam = 16 B each.",
                            2 * base + 12 * t: "each trained parameter has a bf16 weight, an fp32 master copy, a "
                                               "bf16 gradient and two fp32 moments: 16 B.",
                            2 * (a - t) + 16 * square_v: "tiny-llama uses grouped-query attention: v_proj maps 128 "
                                                         "to 64 (2 key/value heads of 32), not to 128."},
                  hint="Build it on the meta device (peft_lab.build_from_config('tiny-llama', device='meta')), look "
                       "at q_proj's and v_proj's in/out features, count r(in + out) per projection and layer; frozen "
                       "weights pay 2 B, each trained parameter 16 B.",
                  explain=f"{t:,} LoRA parameters x 16 B + {base:,} frozen x 2 B = {expected:,} B; v_proj is "
                          "128 -> 64 under grouped-query attention.")


def _ids(x) -> list[int]:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"expected a list of token ids, got {type(x).__name__}")
    return [int(i) for i in x]


@exercise("01.ex4", "Write encode(example, tokenizer) returning {'input_ids': [...], 'labels': [...]} for one task "
                    "example {'prompt', 'answer'}: the prompt's tokens, then the answer as one token with its "
                    "leading space, then end-of-text; labels -100 over the prompt and equal to the ids after it. "
                    "Pass the function itself to check.", kind="build", hidden=lambda: [])
def _encode(answer):
    from transformers import AutoTokenizer

    from ..data import encode_task, load_task
    from ..models import _tiny_dir

    tok = AutoTokenizer.from_pretrained(_tiny_dir(), local_files_only=True)
    examples = load_task("val", n=20) + [{"prompt": r, "answer": review_verdict(r)} for r in NEGATED_REVIEWS]
    wants = [encode_task([ex], tok)[0] for ex in examples]
    gots = [run_student(answer, dict(ex), tok, forbid=(encode_task,)) for ex in examples]
    for ex, want, got in zip(examples, wants, gots):
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
