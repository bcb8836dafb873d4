"""How long prefix and prompt tuning sit on the plateau, and what Li & Liang's text initialisation changes
(notebook 04, section 5.2; writes the committed results file the notebook reads).

    OMP_NUM_THREADS=1 python -m peft_lab.benchmarks.prefix_budget [--out notebooks/results/04_prefix_budget.json]
        [--prefix-steps 1000] [--prompt-steps 2000] [--eval-every 25] [--seeds 0 1 2] [--variants NAME ...]
        [--jobs 2]

The committed file holds the controlled prefix pair on three seeds (six runs of 1,000 steps)::

    OMP_NUM_THREADS=1 python -m peft_lab.benchmarks.prefix_budget --eval-every 50 \
        --variants "prefix, random" "prefix, text init" --jobs 2

Notebook 06's harder setting: reviews of five judged clauses, 200 training reviews (seed 501), 200 validation
reviews (seed 502), batch 16, AdamW with a cosine schedule over the whole budget, P = 10 virtual tokens, the tiny
model, each variant on three seeds (the seed draws a random initialisation and the order of the training
batches; a text initialisation does not depend on it). Five variants, in two controlled pairs plus PEFT's default:

* ``prefix + projection, random`` — PEFT's default prefix (N(0, 1) table, MLP of width 64), lr 3e-3;
* ``prefix, random`` and ``prefix, text init`` — a plain prefix (no projection, as Li & Liang initialise it), lr
  1e-2, starting from N(0, 1) or from the keys and values the frozen model computes for ``INIT_TEXT`` (Li & Liang
  2021, §7.4 "Initialization": a prefix initialised with the activations of real words);
* ``prompt, random init`` and ``prompt, text init`` — N(0, 1) input embeddings (PEFT's RANDOM) or the embeddings
  of ``INIT_TEXT``'s tokens (PEFT's TEXT), lr 0.3.

``INIT_TEXT`` is exactly P tokens long with the tiny tokenizer (checked at start): the prefix starts from the
whole text, neither cut nor repeated. Every ``--eval-every`` steps, on the validation reviews
(:func:`peft_lab.diagnose.answer_diagnostics`): accuracy, the loss on the answer token, the loss on the rest
(end-of-text), the good − bad logit spread and the share of "good" answers. The step a run *leaves the plateau* is
the first evaluation from which validation accuracy stays at or above 60% to the end of the run (60% is 2.8
standard errors above chance for 200 reviews: √(0.25/200) = 3.5 points); a sustained rule, because one evaluation
above 60% can be a fluctuation that falls back to 50%. "Reaches 90%" uses the same rule. Held-out perplexity
(400 documents) with the method on, before and after training.
``--jobs`` runs that many (variant, seed) runs in parallel processes, one torch thread each; every run seeds itself,
so the results do not depend on it.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from .. import diagnose, prefix
from ..corpus import generate_task
from ..data import encode_task, load_heldout, perplexity
from ..models import load_base_model
from ..paths import write_text_atomic
from ..train import train

P, BATCH, LEAVE = 10, 16, 0.60
INIT_TEXT = " good or bad . verdict:"   # 10 tokens with the tiny tokenizer: the two answers and the task's cue
VARIANTS = {  # name: (method, apply(model, tokenizer), learning rate)
    "prefix + projection, random": ("prefix", lambda m, t: prefix.apply_prefix_tuning(m, P, projection_dim=64), 3e-3),
    "prefix, random": ("prefix", lambda m, t: prefix.apply_prefix_tuning(m, P), 1e-2),
    "prefix, text init": ("prefix", lambda m, t: prefix.apply_prefix_tuning(m, P, init="text", init_text=INIT_TEXT,
                                                                            tokenizer=t), 1e-2),
    "prompt, random init": ("prompt", lambda m, t: prefix.apply_prompt_tuning(m, P, init="random"), 3e-1),
    "prompt, text init": ("prompt", lambda m, t: prefix.apply_prompt_tuning(m, P, init="text", init_text=INIT_TEXT,
                                                                            tokenizer=t), 3e-1),
}


def leaves_plateau(steps: list[int], accuracy: list[float], level: float = LEAVE) -> int | None:
    """The first evaluated step from which accuracy stays ≥ ``level`` at every later evaluation (None: the last
    evaluation is below ``level``). Notebook 04 §5.2: a single evaluation above the level is not an exit."""
    exit_step = None
    for s, a in zip(steps, accuracy):
        if a < level:
            exit_step = None
        elif exit_step is None:
            exit_step = s
    return exit_step


def first_reaches(steps: list[int], accuracy: list[float], level: float = LEAVE) -> int | None:
    """The first evaluated step with accuracy ≥ ``level``, whether or not it stays there (None: never)."""
    return next((s for s, a in zip(steps, accuracy) if a >= level), None)


def _setting():
    base, tok = load_base_model("tiny", device="cpu")
    n = len(tok(INIT_TEXT)["input_ids"])
    if n != P:
        raise ValueError(f"INIT_TEXT has {n} tokens, P = {P}: the prefix would start from a cut or repeated text")
    return (base, tok, encode_task(generate_task(200, seed=501, num_clauses=5), tok),
            generate_task(200, seed=502, num_clauses=5), load_heldout())


def run_variant(name: str, seed: int, steps: int, eval_every: int, setting=None) -> dict:
    """One run of variant ``name`` with ``seed`` (initialisation and batch order)."""
    torch.set_num_threads(1)
    base, tok, train_set, val_rows, heldout = setting or _setting()
    method, apply, lr = VARIANTS[name]
    torch.manual_seed(seed)
    model = apply(copy.deepcopy(base), tok)
    ppl_start = perplexity(model, tok, heldout)
    curve: list[dict] = []

    def evaluate(m):
        d = diagnose.answer_diagnostics(m, tok, val_rows)
        curve.append({k: round(v, 5) for k, v in d.items()})
        return d["accuracy"]

    start = time.perf_counter()
    hist = train(model, train_set, steps=steps, batch_size=BATCH, lr=lr, schedule="cosine", eval_fn=evaluate,
                 eval_every=eval_every, seed=seed, pad_id=tok.eos_token_id, desc=f"{name}, seed {seed}",
                 progress=False)
    seconds = time.perf_counter() - start
    acc = [c["accuracy"] for c in curve]
    r = {"seed": seed, "eval_step": hist.eval_step, **{k: [c[k] for c in curve] for k in curve[0]},
         "train_loss_every_step": [round(x, 4) for x in hist.loss],
         "leaves_plateau_step": leaves_plateau(hist.eval_step, acc),
         "reaches_90_step": leaves_plateau(hist.eval_step, acc, 0.90),
         "first_reaches_plateau_level_step": first_reaches(hist.eval_step, acc),
         "final_accuracy": acc[-1], "heldout_ppl_start": ppl_start,
         "heldout_ppl_final": perplexity(model, tok, heldout), "seconds": round(seconds, 1),
         "trainable": hist.trainable_params}
    print(f"{name:<28} seed {seed}: {steps:>5} steps, lr {lr:g}: leaves the plateau at step "
          f"{r['leaves_plateau_step']}, 90% at {r['reaches_90_step']}, final {r['final_accuracy']:.1%}; held-out "
          f"ppl {r['heldout_ppl_start']:,.1f} -> {r['heldout_ppl_final']:,.1f}; {r['seconds']:.0f} s", flush=True)
    return r


def _job(args):
    return args[:2], run_variant(*args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="notebooks/results/04_prefix_budget.json")
    parser.add_argument("--prefix-steps", type=int, default=1000)
    parser.add_argument("--prompt-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    base, tok, train_set, val_rows, heldout = setting = _setting()
    steps = {name: args.prefix_steps if VARIANTS[name][0] == "prefix" else args.prompt_steps for name in VARIANTS}
    jobs = [(name, seed, steps[name], args.eval_every) for seed in args.seeds for name in args.variants]
    command = "OMP_NUM_THREADS=1 python -m peft_lab.benchmarks.prefix_budget " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    base_record = {"base_heldout_ppl": perplexity(base, tok, heldout),
                   "base_diagnostics": diagnose.answer_diagnostics(base, tok, val_rows)}
    started, done = time.perf_counter(), {}

    def write() -> None:  # after every run, so that a long command leaves what it finished
        variants = {}
        for name in args.variants:
            method, _, lr = VARIANTS[name]
            runs = [done[name, seed] for seed in args.seeds if (name, seed) in done]
            ids = tok(INIT_TEXT)["input_ids"] if "text" in name else None
            variants[name] = {"method": method, "lr": lr, "steps": steps[name],
                              "trainable": runs[0]["trainable"] if runs else None,
                              "init_text": INIT_TEXT if ids else None,
                              "init_tokens": [tok.decode([i]) for i in ids] if ids else None, "runs": runs}
        record = {"command": command, "complete": len(done) == len(jobs), "torch": torch.__version__,
                  "python": platform.python_version(), "total_seconds": round(time.perf_counter() - started, 1),
                  "setting": {"num_clauses": 5, "train_reviews": 200, "train_seed": 501, "val_reviews": 200,
                              "val_seed": 502, "batch_size": BATCH, "schedule": "cosine", "num_virtual_tokens": P,
                              "seeds": args.seeds, "eval_every": args.eval_every,
                              "heldout_documents": len(heldout), "leave_plateau_accuracy": LEAVE,
                              "leave_plateau_rule": "sustained", "model": "tiny"},
                  **base_record, "variants": variants}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")

    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for key, r in pool.imap_unordered(_job, jobs):
                done[key] = r
                write()
    else:
        for j in jobs:
            done[j[:2]] = run_variant(*j, setting=setting)
            write()
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
