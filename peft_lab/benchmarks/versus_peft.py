"""peft_lab against PEFT for every method PEFT has — LoRA, prefix tuning, prompt tuning — in one run, on CPU
(notebook 06, "Cost").

    python -m peft_lab.benchmarks.versus_peft [--models tiny gpt2] [--batch 2] [--seq 32] [--repeats N] [--threads T]

For each method and model, ours and PEFT's start from the same base and the same adapter weights, and two
figures are put side by side:

* training-step time (forward, backward, AdamW step), interleaved rounds (A B, B A, ...) and the median of
  the per-round ratio ours / PEFT's — goal ≤ 1.0;
* training-step memory by tensor accounting (:func:`peft_lab.measure_memory`: parameters, gradients, AdamW
  state, activations) — goal ≤ 1.0.

Both implementations do the same arithmetic; a time ratio near 1 within the run-to-run noise (a few percent,
more on a loaded machine — the header prints the load average) is parity.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from ..lora import apply_lora, load_lora_state_dict
from ..measure import measure_memory
from ..prefix import apply_prefix_tuning, apply_prompt_tuning
from . import base_model, interleaved_times, paired_ratio, train_step

P = 20  # virtual tokens for prefix and prompt tuning (PEFT's examples use 20)


def _pair(method: str, base):
    """(ours, PEFT's) with the same adapter weights (PEFT's random init, non-zero, copied into ours)."""
    import peft
    if method == "LoRA":
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        ours = apply_lora(copy.deepcopy(base), rank=8, alpha=16)
        prefix = "base_model.model."
        load_lora_state_dict(ours, {k[len(prefix):].replace(".default", ""): v
                                    for k, v in theirs.state_dict().items() if "lora_" in k})
        return ours, theirs
    if method == "prefix":
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(num_virtual_tokens=P,
                                                                                   task_type="CAUSAL_LM"))
        ours = apply_prefix_tuning(copy.deepcopy(base), num_virtual_tokens=P)
    else:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=P,
                                                                                   task_type="CAUSAL_LM"))
        ours = apply_prompt_tuning(copy.deepcopy(base), num_virtual_tokens=P)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return ours, theirs


def bench(method: str, name: str, batch_size: int, seq: int, repeats: int) -> dict | None:
    base = base_model(name)
    if base is None:
        return None
    ids = torch.randint(0, base.config.vocab_size, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ours, theirs = _pair(method, base)
    times = interleaved_times({"ours": train_step(ours, batch), "peft": train_step(theirs, batch)}, repeats)
    mem_ours, mem_peft = measure_memory(ours, batch), measure_memory(theirs, batch)
    return {"ms_ours": 1000 * sorted(times["ours"])[len(times["ours"]) // 2],
            "ms_peft": 1000 * sorted(times["peft"])[len(times["peft"]) // 2],
            "time_ratio": paired_ratio(times, "ours", "peft"),
            "mib_ours": mem_ours["total"] / 2**20, "mib_peft": mem_peft["total"] / 2**20,
            "memory_ratio": mem_ours["total"] / mem_peft["total"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "gpt2"])
    ap.add_argument("--methods", nargs="+", default=["LoRA", "prefix", "prompt"], choices=["LoRA", "prefix", "prompt"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}; batch "
          f"{args.batch}x{args.seq}, {args.repeats} interleaved rounds; P = {P} virtual tokens")
    print(f"{'method':>7} {'model':>5} | {'step ms ours':>12} {'PEFT':>8} {'ratio':>6} | "
          f"{'memory MiB ours':>15} {'PEFT':>8} {'ratio':>6}")
    results = {}
    for method in args.methods:
        for name in args.models:
            r = bench(method, name, args.batch, args.seq, args.repeats)
            if r is None:
                print(f"{method:>7} {name:>5} | skipped (model not found)")
                continue
            results[method, name] = r
            print(f"{method:>7} {name:>5} | {r['ms_ours']:>12.1f} {r['ms_peft']:>8.1f} {r['time_ratio']:>6.3f} | "
                  f"{r['mib_ours']:>15.1f} {r['mib_peft']:>8.1f} {r['memory_ratio']:>6.3f}")
    return results


if __name__ == "__main__":
    main()
