"""Benchmark peft_lab's prefix tuning and prompt tuning against PEFT's, on CPU (notebook 04, "Measure").

    python -m peft_lab.benchmarks.prefix [--models tiny gpt2] [--batch 2] [--seq 32] [--tokens 20]
                                         [--lengths 0 8 32 64] [--repeats N] [--threads T]

Per model, times are medians over interleaved rounds (A B, B A, ...); a ratio is the median over rounds of the
two times measured in the same round, which cancels most drift in machine load:

* training step (forward, backward, AdamW step) of peft_lab vs PEFT, for prefix tuning and for prompt tuning
  (``--tokens`` virtual tokens, the same weights); goal: ratio ≤ 1.0;
* inference forward of peft_lab prefix tuning against the base model as the prefix length P grows
  (``--lengths``): the attention of every layer covers P + T keys instead of T (notebook 04, "positions and
  cost"), and the prefix cache is built on every call.

Models: ``tiny`` (data/tiny, skipped if absent) and the gpt2-small architecture with random weights. Threads:
torch's default unless ``--threads``; on a machine shared with other busy processes ``--threads 1`` gives
steadier figures, and the header prints the load average.
"""
from __future__ import annotations

import argparse
import copy

import torch

from .. import prefix
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


def bench_model(name: str, tokens: int, lengths: list[int], batch: int, seq: int, repeats: int) -> dict | None:
    """Times for one model; ``None`` when the model is not available."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    base = base_model(name)
    if base is None:
        return None
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    train = {}
    for method, apply, config in [
            ("prefix tuning", prefix.apply_prefix_tuning, PrefixTuningConfig),
            ("prompt tuning", prefix.apply_prompt_tuning, PromptTuningConfig)]:
        # prompt learning leaves the base's modules as they are, so both wrap the same base (no copy)
        theirs = get_peft_model(base, config(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
        ours = apply(base, tokens)
        ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
        ours.train(), theirs.train()
        train[method] = interleaved_times({"peft_lab": train_step(ours, ids), "peft": train_step(theirs, ids)},
                                          repeats=repeats)
        prefix.remove_prefix(ours)
        del theirs, ours
    base.eval()
    fns = {"base": forward(base, ids)}
    for P in lengths:
        if P > 0:
            wrapped = prefix.apply_prefix_tuning(copy.deepcopy(base), P).eval()
            fns[f"P={P}"] = forward(wrapped, ids)
    infer = interleaved_times(fns, repeats=3 * repeats)
    return {"name": name, "params": sum(p.numel() for p in base.parameters()), "train": train, "infer": infer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--tokens", type=int, default=20, help="virtual tokens for the training-step comparison")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 64], help="prefix lengths P (inference)")
    args = parser.parse_args(argv)
    print(f"{machine_line(args)}; times: "
          f"medians of interleaved rounds, ratio: median of per-round ratios")
    print_header(40)
    for name in args.models:
        repeats = args.repeats or (25 if name == "tiny" else 7)
        r = bench_model(name, args.tokens, args.lengths, args.batch, args.seq, repeats)
        if r is None:
            print(f"{name:<8}  (not available: build data/tiny first)")
            continue
        rows = [(f"train step, {m} P={args.tokens}: vs PEFT", times, "peft_lab", "peft", "<= 1.00")
                for m, times in r["train"].items()]
        rows += [(f"inference, prefix {k}: vs base", r["infer"], k, "base", "")
                 for k in r["infer"] if k != "base"]
        print_rows(name, r["params"], rows, 40)


if __name__ == "__main__":
    main()
