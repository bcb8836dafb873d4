"""How long prefix and prompt tuning sit on the plateau, and what Li & Liang's text initialisation changes
(notebook 04, "the plateau"; writes the committed results file the notebook reads).

    OMP_NUM_THREADS=1 python -m peft_lab.benchmarks.prefix_budget [--out notebooks/results/04_prefix_budget.json]
        [--prefix-steps 1000] [--prompt-steps 2000] [--eval-every 25] [--variants NAME ...]

Notebook 05's harder setting: reviews of five judged clauses, 200 training reviews (seed 501), 200 validation
reviews (seed 502), batch 16, AdamW with a cosine schedule over the whole budget, P = 10 virtual tokens, one
seed, the tiny model. Four variants (learning rates from notebook 05's grids and the probes recorded in the README):

* ``prefix + projection, random`` — PEFT's default prefix (N(0, 1) table, MLP of width 64), lr 3e-3;
* ``prefix, text init`` — no projection, the prefix starts as the keys and values of a text's first 10 tokens
  (Li & Liang 2021 §7.2), lr 1e-2;
* ``prompt, random init`` — N(0, 1) input embeddings (PEFT's RANDOM), lr 0.3;
* ``prompt, text init`` — the embeddings of an instruction's tokens (PEFT's TEXT), lr 0.3.

Every ``--eval-every`` steps, on the validation reviews (:func:`peft_lab.diagnose.answer_diagnostics`):
accuracy, the loss on the answer token, the loss on the rest (end-of-text), the good − bad logit spread. The
step a variant *leaves the plateau* is the first evaluation at which validation accuracy reaches 60% (three
standard errors above chance for 200 reviews). Held-out perplexity (400 documents) with the method on, before
and after training. The JSON records the command, the git commit, torch, the machine and its load.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
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
INIT_TEXT = "decide if this review is good or bad . verdict:"
VARIANTS = {  # name: (method, apply(model, tokenizer), learning rate)
    "prefix + projection, random": ("prefix", lambda m, t: prefix.apply_prefix_tuning(m, P, projection_dim=64), 3e-3),
    "prefix, text init": ("prefix", lambda m, t: prefix.apply_prefix_tuning(m, P, init="text", init_text=INIT_TEXT,
                                                                            tokenizer=t), 1e-2),
    "prompt, random init": ("prompt", lambda m, t: prefix.apply_prompt_tuning(m, P, init="random"), 3e-1),
    "prompt, text init": ("prompt", lambda m, t: prefix.apply_prompt_tuning(m, P, init="text", init_text=INIT_TEXT,
                                                                            tokenizer=t), 3e-1),
}


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def leaves_plateau(steps: list[int], accuracy: list[float], level: float = LEAVE) -> int | None:
    """The first evaluated step with accuracy ≥ ``level`` (None: never within the budget)."""
    return next((s for s, a in zip(steps, accuracy) if a >= level), None)


def run_variant(name: str, base, tok, train_set, val_rows, heldout, steps: int, eval_every: int) -> dict:
    method, apply, lr = VARIANTS[name]
    torch.manual_seed(0)
    model = apply(copy.deepcopy(base), tok)
    ppl_start = perplexity(model, tok, heldout)
    curve: list[dict] = []

    def evaluate(m):
        d = diagnose.answer_diagnostics(m, tok, val_rows)
        curve.append({k: round(v, 5) for k, v in d.items()})
        return d["accuracy"]

    start = time.perf_counter()
    hist = train(model, train_set, steps=steps, batch_size=BATCH, lr=lr, schedule="cosine", eval_fn=evaluate,
                 eval_every=eval_every, seed=0, pad_id=tok.eos_token_id, desc=name)
    seconds = time.perf_counter() - start
    acc = [c["accuracy"] for c in curve]
    return {"method": method, "lr": lr, "steps": steps, "trainable": hist.trainable_params,
            "init_text": INIT_TEXT if "text" in name else None,
            "eval_step": hist.eval_step, **{k: [c[k] for c in curve] for k in curve[0]},
            "train_loss_every_step": [round(x, 4) for x in hist.loss],
            "leaves_plateau_step": leaves_plateau(hist.eval_step, acc),
            "reaches_90_step": leaves_plateau(hist.eval_step, acc, 0.90),
            "final_accuracy": acc[-1], "heldout_ppl_start": ppl_start,
            "heldout_ppl_final": perplexity(model, tok, heldout), "seconds": round(seconds, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="notebooks/results/04_prefix_budget.json")
    parser.add_argument("--prefix-steps", type=int, default=1000)
    parser.add_argument("--prompt-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    commit = _git_commit()  # the code that runs: read before training, while edits may follow
    base, tok = load_base_model("tiny", device="cpu")
    train_set = encode_task(generate_task(200, seed=501, num_clauses=5), tok)
    val_rows = generate_task(200, seed=502, num_clauses=5)
    heldout = load_heldout()
    started = time.perf_counter()
    results = {}
    for name in args.variants:
        steps = args.prefix_steps if VARIANTS[name][0] == "prefix" else args.prompt_steps
        r = run_variant(name, base, tok, train_set, val_rows, heldout, steps, args.eval_every)
        results[name] = r
        print(f"{name:<30} {steps:>5} steps, lr {r['lr']:g}: leaves the plateau (val acc >= {LEAVE:.0%}) at step "
              f"{r['leaves_plateau_step']}, 90% at {r['reaches_90_step']}, final {r['final_accuracy']:.1%}; "
              f"held-out ppl {r['heldout_ppl_start']:,.1f} -> {r['heldout_ppl_final']:,.1f}; {r['seconds']:.0f} s",
              flush=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    record = {
        "command": "OMP_NUM_THREADS=1 python -m peft_lab.benchmarks.prefix_budget" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "git_commit": commit, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s)",
        "load_average_start_end": [round(load_start, 2), round(load_end, 2)],
        "total_seconds": round(time.perf_counter() - started, 1),
        "setting": {"num_clauses": 5, "train_reviews": 200, "train_seed": 501, "val_reviews": 200, "val_seed": 502,
                    "batch_size": BATCH, "schedule": "cosine", "num_virtual_tokens": P, "seed": 0,
                    "heldout_documents": len(heldout), "leave_plateau_accuracy": LEAVE, "model": "tiny"},
        "base_heldout_ppl": perplexity(base, tok, heldout),
        "base_diagnostics": diagnose.answer_diagnostics(base, tok, val_rows),
        "variants": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({record['total_seconds']:.0f} s, load {load_start:.1f} -> {load_end:.1f})")


if __name__ == "__main__":
    main()
