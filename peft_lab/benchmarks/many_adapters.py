"""Serving many LoRA adapters from one base, on CPU (notebook 09, "Costs"): three ways side by side in one run.

    python -m peft_lab.benchmarks.many_adapters [--models tiny] [--batch 16] [--seq 32] [--adapters 1 2 4 8 16]

A batch of ``--batch`` rows, the rows spread evenly over N adapters of rank ``--rank``, served

* **merged, swapping**: one adapter merged into the weights at a time (W + s·BA written, the rows of that
  adapter run, then the next adapter's update replaces it) — what a server without mixed-batch support does;
* **grouped**: PEFT's mixed batch (09.2), one sub-batch per adapter through the unmerged layers;
* **gathered**: stacked factors indexed per row and one batched product (09.3), Punica's idea.

Printed per N: tokens per second of each, their ratios to *grouped* (the median over rounds of per-round
ratios, interleaved rounds), and the memory of N adapters (their factors) against N merged copies of the
model. On a GPU the picture changes: kernel launches, not arithmetic, dominate small products, which is what
one gathered kernel (SGMV/BGMV) saves; a CPU shows the arithmetic and Python overhead only.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from .. import multi_lora as ml
from ..core import fill_seeded
from ..lora import LoRAConfig
from . import add_common_arguments, base_model, interleaved_times, machine_line, paired_ratio


def servers(model, ids: torch.Tensor, rows: list[str]):
    """The three ways to serve ``ids`` whose row b belongs to adapter ``rows[b]``: functions of no argument."""
    names = list(dict.fromkeys(rows))
    layers = [layer for _, layer in ml._layers(model)]

    @torch.no_grad()
    def merged_swapping():
        for name in names:
            index = [b for b, a in enumerate(rows) if a == name]
            deltas = [(layer, layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight)
                      for layer in layers]
            for layer, d in deltas:                       # merge this adapter (02.7), in the stored layout
                layer.base_layer.weight += d.T if layer.fan_in_fan_out else d
            ml.set_active_adapter(model, None)
            model(input_ids=ids[index])
            for layer, d in deltas:                       # and take it out again
                layer.base_layer.weight -= d.T if layer.fan_in_fan_out else d

    def mixed(how):
        @torch.no_grad()
        def run():
            with ml.mixed_batch(model, rows, how=how):
                model(input_ids=ids)
        return run
    return {"merged, swapping": merged_swapping, "grouped": mixed("grouped"), "gathered": mixed("gathered")}


def bench(name: str, counts: list[int], rank: int, batch: int, seq: int, repeats: int) -> list[dict] | None:
    base = base_model(name)
    if base is None:
        return None
    base.eval()
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    out = []
    for n in counts:
        model = copy.deepcopy(base)
        for k in range(n):
            ml.add_lora_adapter(model, f"a{k}", LoRAConfig(rank, 2 * rank))
            fill_seeded(ml._live(model, f"a{k}"), seed=k, std=0.02)
        rows = [f"a{b % n}" for b in range(batch)]
        times = interleaved_times(servers(model, ids, rows), repeats=repeats)
        adapter_bytes = sum(t.numel() * t.element_size() for t in ml._live(model, "a0").values()) * n
        out.append({"n": n, "times": times, "adapter_bytes": adapter_bytes, "copies_bytes": n * model_bytes})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(models=["tiny"], batch=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    print(f"{machine_line(args)}, rank {args.rank}; tokens/s: median of interleaved rounds; ratio to grouped: "
          "median of per-round ratios (> 1: slower than grouped)")
    for name in args.models:
        results = bench(name, args.adapters, args.rank, args.batch, args.seq, args.repeats or 9)
        if results is None:
            print(f"{name}: not available (build data/tiny first)")
            continue
        ways = list(results[0]["times"])
        short = {"merged, swapping": "swap", "grouped": "grouped", "gathered": "gathered"}
        print(f"\n{name} (swap = merged, swapping)")
        print(f"{'N':>3}" + "".join(f"{short[w] + ' tok/s':>16}" for w in ways)
              + "".join(f"{short[w] + '/grouped':>18}" for w in ways if w != "grouped")
              + f"{'N adapters':>14}{'N merged copies':>17}")
        tokens = args.batch * args.seq
        for r in results:
            t = r["times"]
            speeds = "".join(f"{tokens / statistics.median(t[w]):>16,.0f}" for w in ways)
            ratios = "".join(f"{paired_ratio(t, w, 'grouped'):>18.2f}" for w in ways if w != "grouped")
            print(f"{r['n']:>3}{speeds}{ratios}{r['adapter_bytes'] / 2**20:>10.2f} MiB"
                  f"{r['copies_bytes'] / 2**20:>13.1f} MiB")


if __name__ == "__main__":
    main()
