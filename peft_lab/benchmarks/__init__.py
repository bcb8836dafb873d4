"""Benchmarks: scripts, not tests, that time a peft_lab method against its reference implementation.

Run one with ``python -m peft_lab.benchmarks.<method>`` (e.g. ``python -m peft_lab.benchmarks.lora``); each
prints a small table. They share :func:`interleaved_medians`, which alternates the contenders so that a
slow drift of the machine (heat, another process) hits both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch

from ..measure import interleaved_times
from ..models import build_from_config, load_base_model
from ..paths import data_dir


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed by :func:`interleaved_times`."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, warmup).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time[a] / time[b]`` measured in the same round: robust to machine-load drift."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def print_header(label_width: int) -> None:
    """The header of the table every benchmark prints: model, size, what is compared, both medians, ratio."""
    header = f"{'model':<8}{'params':>12}  {'':<{label_width}}{'peft_lab':>11}{'reference':>11}{'ratio':>8}  goal"
    print(header)
    print("-" * len(header))


def print_rows(name: str, params: int, rows, label_width: int) -> None:
    """One model's rows ``(label, times, a, b, goal)``: the medians of ``times[a]`` and ``times[b]`` in ms,
    their :func:`paired_ratio` and the goal; the model's name and size on the first row only."""
    for k, (label, times, a, b, goal) in enumerate(rows):
        first = f"{name:<8}{params:>12,}" if k == 0 else " " * 20
        ta, tb = statistics.median(times[a]), statistics.median(times[b])
        print(f"{first}  {label:<{label_width}}{ta * 1e3:>9.1f}ms{tb * 1e3:>9.1f}ms"
              f"{paired_ratio(times, a, b):>8.3f}  {goal}")


def base_model(name: str):
    """The base model a benchmark runs on: ``"tiny"`` from data/ (``None`` if absent), else an architecture
    of :func:`peft_lab.build_from_config` with random weights, on the CPU."""
    if name == "tiny":
        if not (data_dir() / "tiny" / "config.json").is_file():
            return None
        return load_base_model("tiny", device="cpu")[0]
    return build_from_config(name, device="cpu")


def train_step(model, batch) -> Callable[[], None]:
    """One AdamW training step (forward, backward, update) of ``model`` on ``batch`` — token ids (the labels
    are the ids) or a dict of model inputs with ``labels``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch, "labels": batch}

    def step():
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def forward(model, ids) -> Callable[[], None]:
    """One inference forward pass of ``model`` on token ids, without autograd."""
    @torch.no_grad()
    def fwd():
        model(input_ids=ids)
    return fwd


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: models, batch × sequence, rounds, torch threads."""
    parser.add_argument("--models", nargs="+", default=["tiny", "gpt2"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None,
                        help="training rounds per model (inference: 3×); default 25 for tiny, 7 otherwise")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")


def machine_line(args: argparse.Namespace) -> str:
    """Apply ``--threads``; return the header's first words: torch, threads, CPUs and the load average
    (a busy machine makes every time noisy)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs (load average "
            f"{load:.1f}: a busy machine makes every time noisy), batch {args.batch}×{args.seq} tokens")
