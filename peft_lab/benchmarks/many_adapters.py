"""Serving many LoRA adapters from one base, on CPU (notebook 09, "Costs"): three ways side by side in one run.

    python -m peft_lab.benchmarks.many_adapters [--models tiny] [--batch 16] [--seq 32] [--adapters 1 2 4 8 16]
    python -m peft_lab.benchmarks.many_adapters --smoke      # seconds: N = 1, 2, 4, two rounds

Writes ``notebooks/results/09_many_adapters.json`` (``--out``), which notebook 09 reads: the command, commit,
library versions, CPU, threads and the load at the start and end, and per model and N the seconds of every
round of each way, tokens/s (median), the paired ratios to *grouped* and the bytes of N adapters vs N copies.

A batch of ``--batch`` rows, the rows spread evenly over N adapters of rank ``--rank``, served

* **merged, swapping**: one adapter merged into the weights at a time (W + s·BA written, the rows of that
  adapter run, then the next adapter's update replaces it) — what a server without mixed-batch support does;
* **grouped**: PEFT's mixed batch (09.2), one sub-batch per adapter through the unmerged layers;
* **gathered**: stacked factors indexed per row and one batched product (09.3), Punica's idea.

Printed per N: tokens per second of each, their ratios to *grouped* (the median over rounds of per-round
ratios, interleaved rounds), the fastest way by those ratios, and the memory of N adapters (their factors) and
of one base plus N adapters against N merged copies of the model. On a GPU the picture changes: kernel
launches, not arithmetic, dominate small products, which is what one gathered kernel (SGMV/BGMV) saves; a CPU
shows the arithmetic and Python overhead only.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from .. import multi_lora as ml
from ..core import fill_seeded
from ..lora import LoRAConfig
from ..paths import write_text_atomic
from . import add_common_arguments, base_model, interleaved_times, machine_line, paired_ratio
from .head_to_head import _cpu_name, _git_commit, _load

OUT = "notebooks/results/09_many_adapters.json"
SHORT = {"merged, swapping": "swap", "grouped": "grouped", "gathered": "gathered"}


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


def summary(results: list[dict], tokens: int) -> list[dict]:
    """Per N: tokens/s of each way (median over rounds), the ratio of each to grouped (median of per-round
    ratios, > 1: slower than grouped), and the bytes of N adapters and of N merged copies."""
    rows = []
    for r in results:
        t = r["times"]
        rows.append({"n": r["n"], "tokens_per_s": {w: tokens / statistics.median(t[w]) for w in t},
                     "time_ratio_to_grouped": {w: paired_ratio(t, w, "grouped") for w in t if w != "grouped"},
                     "adapter_bytes": r["adapter_bytes"], "copies_bytes": r["copies_bytes"],
                     "seconds_per_round": t})
    return rows


def fastest(row: dict) -> str:
    """The fastest way at one N by the paired ratios to grouped (grouped's own ratio is 1): the same statistic
    as the ratios the table prints, so "fastest" and the ratios cannot disagree."""
    ratios = {"grouped": 1.0, **row["time_ratio_to_grouped"]}
    return min(ratios, key=ratios.get)


def print_table(name: str, rows: list[dict]) -> None:
    ways = list(rows[0]["tokens_per_s"])
    print(f"\n{name} (swap = merged, swapping)")
    print(f"{'N':>3}" + "".join(f"{SHORT[w] + ' tok/s':>16}" for w in ways)
          + "".join(f"{SHORT[w] + '/grouped':>18}" for w in ways if w != "grouped")
          + f"{'fastest':>10}{'N adapters':>14}{'base + N adapters':>19}{'N merged copies':>17}")
    for r in rows:
        speeds = "".join(f"{r['tokens_per_s'][w]:>16,.0f}" for w in ways)
        ratios = "".join(f"{r['time_ratio_to_grouped'][w]:>18.2f}" for w in ways if w != "grouped")
        held = r["copies_bytes"] / r["n"] + r["adapter_bytes"]          # one base (copies / N) and the N adapters
        print(f"{r['n']:>3}{speeds}{ratios}{SHORT[fastest(r)]:>10}{r['adapter_bytes'] / 2**20:>10.2f} MiB"
              f"{held / 2**20:>15.2f} MiB{r['copies_bytes'] / 2**20:>13.1f} MiB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(models=["tiny"], batch=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--smoke", action="store_true", help="N = 1, 2, 4 and two rounds: checks the script runs")
    parser.add_argument("--out", default=OUT, help="the JSON results file (notebook 09 reads the default)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.adapters, args.repeats = [n for n in args.adapters if n <= 4], args.repeats or 2
    import peft
    import transformers
    argv = sys.argv[1:] if argv is None else list(argv)
    record = {"command": "python -m peft_lab.benchmarks.many_adapters " + " ".join(argv), "smoke": args.smoke,
              "commit": _git_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "python": platform.python_version(),
              "machine": f"{_cpu_name()}, {__import__('os').cpu_count()} CPUs, {platform.system()}",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_start": _load()}
    print(f"{machine_line(args)}, rank {args.rank}; tokens/s: median of interleaved rounds; ratio to grouped: "
          "median of per-round ratios (> 1: slower than grouped); fastest: by those ratios")
    record.update(threads=torch.get_num_threads(), rank=args.rank, batch=args.batch, seq=args.seq,
                  repeats=args.repeats or 9, rows_per_adapter="row b belongs to adapter b mod N", models={})
    for name in args.models:
        results = bench(name, args.adapters, args.rank, args.batch, args.seq, args.repeats or 9)
        if results is None:
            print(f"{name}: not available (build data/tiny first)")
            continue
        rows = summary(results, args.batch * args.seq)
        record["models"][name] = rows
        print_table(name, rows)
    record["load_end"] = _load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
