"""Benchmark peft_lab's LoRA against PEFT's, on CPU (notebook 02, "Measure").

    python -m peft_lab.benchmarks.lora [--models tiny gpt2] [--batch 2] [--seq 32] [--repeats N] [--threads T]

Two comparisons per model. Times are medians over interleaved rounds (A B, B A, ...); the ratio is the
median over rounds of the two times measured in the same round, which cancels most drift in machine load:

* training step (forward, backward, AdamW step) of peft_lab LoRA vs PEFT LoRA — same rank, targets and
  weights; goal: ratio ≤ 1.0 (both do the same arithmetic; differences are Python overhead and noise);
* inference forward of the merged peft_lab model vs the plain base model — goal: ratio ≤ 1.02 (Hu et al.
  2021: a merged LoRA adds no latency). "merged" keeps the LoRALinear wrappers (one flag test per layer);
  "merged+removed" has them replaced by the plain layers (:func:`peft_lab.lora.remove_lora`).

Models: ``tiny`` (data/tiny, skipped if absent) and the gpt2-small architecture with random weights.
Threads: torch's default (``torch.get_num_threads()``) unless ``--threads``. On a machine shared with other
busy processes, multi-threaded steps can slow down many times over (threads wait for each other); the
header prints the load average, and ``--threads 1`` gives steadier figures there.
"""
from __future__ import annotations

import argparse
import copy

import torch

from .. import lora
from . import (
    add_common_arguments,
    base_model,
    forward,
    interleaved_times,
    machine_line,
    print_header,
    print_rows,
    train_step,
)


def bench_model(name: str, rank: int, batch: int, seq: int, repeats: int) -> dict | None:
    """Times for one model; ``None`` when the model is not available."""
    from peft import LoraConfig, get_peft_model

    base = base_model(name)
    if base is None:
        return None
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ours = lora.apply_lora(copy.deepcopy(base), rank=rank, alpha=2 * rank)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, task_type="CAUSAL_LM",
                                                            fan_in_fan_out=base.config.model_type == "gpt2"))
    ours.train(), theirs.train()
    train = interleaved_times({"peft_lab": train_step(ours, ids), "peft": train_step(theirs, ids)},
                              repeats=repeats)
    del theirs
    ours.eval()
    with torch.no_grad():
        for t in lora.lora_state_dict(ours).values():
            t.normal_(0, 0.02)
    merged = lora.merge_lora(ours)
    removed = lora.remove_lora(copy.deepcopy(merged), merge=True)
    infer = interleaved_times({"base": forward(base, ids), "merged": forward(merged, ids),
                               "merged+removed": forward(removed, ids)}, repeats=3 * repeats)
    return {"name": name, "params": sum(p.numel() for p in base.parameters()), "train": train, "infer": infer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"{machine_line(args)}, "
          f"rank {args.rank}, default target modules; times: medians of interleaved rounds, ratio: median of "
          f"per-round ratios")
    print_header(36)
    for name in args.models:
        repeats = args.repeats or (25 if name == "tiny" else 7)
        r = bench_model(name, args.rank, args.batch, args.seq, repeats)
        if r is None:
            print(f"{name:<8}  (not available: build data/tiny first)")
            continue
        rows = [("train step: peft_lab LoRA vs PEFT LoRA", r["train"], "peft_lab", "peft", "<= 1.00"),
                ("inference: merged vs base", r["infer"], "merged", "base", "<= 1.02"),
                ("inference: merged+removed vs base", r["infer"], "merged+removed", "base", "<= 1.02")]
        print_rows(name, r["params"], rows, 36)


if __name__ == "__main__":
    main()
