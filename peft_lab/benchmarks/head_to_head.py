"""Notebook 06's full profile, run headless: every method at an equal budget and at an equal accuracy.

``python -m peft_lab.benchmarks.head_to_head --out notebooks/results/06_full_profile.json`` trains every
method of :data:`peft_lab.compare.METHODS` on notebook 06's setting and writes one JSON file that notebook 06
(every profile) and the README draw their head-to-head from. Two views:

* **equal budget** — 300 cosine steps for everyone (the cost of being slow is part of the truth). Each
  method's learning rate is chosen on seed 0 from a small grid by the *validation loss on the answer token*
  (:func:`peft_lab.compare.answer_loss`), not by accuracy: on 200 reviews one review is half a point, and a
  near-tie in accuracy can flip the choice between two machines; the loss orders rates by how sure
  the model is. A choice at an edge of the grid adds the next rate beyond it (twice at most). Then seeds 1
  and 2 at that rate.
* **equal accuracy** — each method trained long enough to reach 90% / 95% validation accuracy, up to a cap:
  methods that reach 95% within 300 steps in every seed reuse the equal-budget runs; prefix and prompt
  tuning get their own, longer budget with its own grid; every other method that misses 95% in some seed
  gets the same treatment at ``extend_steps`` (600): a grid of three rates around its 300-step choice on
  seed 0, the lowest validation loss chosen, then the other seeds (as long as the time limit allows).

Every run also records held-out perplexity with the method on, so the grid gives forgetting at two or more
learning rates per method with everything else fixed. Training runs in ``--jobs`` processes of one thread
each (default: one per CPU; every run computes the same numbers in any of them). Step time is measured once,
after training, with nothing else running, all methods in alternation; "wall time to accuracy" is steps ×
that median (labelled so), because wall time of a run on a shared CPU measures the machine as much as the
method.

``--smoke`` runs a few steps of three methods (seconds); ``--readme`` regenerates the README section, its
figure and notebook 06's §10 argument from the committed file (:mod:`peft_lab.benchmarks.head_to_head_report`).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import compare
from ..corpus import generate_task
from ..data import collate, encode_task, evaluate_task, load_heldout, perplexity
from ..measure import measure_memory, time_fn
from ..models import load_base_model
from ..paths import write_text_atomic
from ..qlora import nf4_layers

RESULTS = Path("notebooks") / "results" / "06_full_profile.json"
MiB = 2 ** 20


@dataclass(frozen=True)
class Plan:
    """What one method gets. ``grid``: the 300-step learning rates tried on seed 0 (``same_as``: no grid, the
    rate of that method, one seed — PEFT's LoRA is the same computation as ours). ``long_steps`` and
    ``long_lrs``: the equal-accuracy budget for a method that 300 steps cannot bring to 95%."""

    grid: tuple[float, ...] = ()
    same_as: str | None = None
    long_steps: int | None = None
    long_lrs: tuple[float, ...] = ()
    long_eval_every: int = 50


@dataclass(frozen=True)
class Profile:
    name: str
    plan: dict[str, Plan]
    steps: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 200
    n_val: int = 200
    n_test: int = 500
    num_clauses: int = 5
    batch_size: int = 16
    eval_every: int = 25
    heldout_n: int = 200
    targets: tuple[float, ...] = (0.90, 0.95)
    extend_steps: int = 600          # the long budget of a method without long_steps that misses 95% in 300
    timing_repeats: int = 9
    widen: int = 2                   # rates added beyond a grid's edge when the choice sits on it


# Grids are a factor ~3 apart around the previous full profile's choices. A choice at an edge of its grid is
# widened automatically (one more rate beyond that edge, up to ``widen`` times: :func:`_grid_then_seeds`), so
# every chosen rate ends up bracketed or the file says it is not ("edge": true). Prefix and prompt tuning stay
# at the constant answer for 300 steps at every rate (the README's rates table): their real budget is the long runs,
# prefix 1,000 steps and prompt 2,000, each with its own grid
# on seed 0. QLoRA is LoRA r=8 on an NF4 base: its own grid, so a rate that suits the quantized base is not
# assumed. PEFT's LoRA and IA3 run once at our methods' rates: the check that the same computation learns the
# same way.
FULL = Profile("full", {
    "full FT": Plan(grid=(1e-4, 3e-4, 1e-3)),
    "LoRA r=1": Plan(grid=(3e-3, 1e-2, 3e-2)),
    "LoRA r=8": Plan(grid=(3e-3, 1e-2, 3e-2)),
    "Houlsby": Plan(grid=(3e-3, 1e-2, 3e-2)),
    "Pfeiffer": Plan(grid=(1e-3, 3e-3, 1e-2)),
    "prefix": Plan(grid=(3e-3, 1e-2, 3e-2), long_steps=1000, long_lrs=(1e-3, 3e-3, 1e-2), long_eval_every=50),
    "prompt": Plan(grid=(1e-1, 3e-1, 1.0), long_steps=2000, long_lrs=(1e-1, 3e-1, 1.0), long_eval_every=100),
    "IA3": Plan(grid=(3e-2, 1e-1, 3e-1)),
    "DoRA r=8": Plan(grid=(3e-3, 1e-2, 3e-2)),
    "QLoRA r=8": Plan(grid=(3e-3, 1e-2, 3e-2)),
    "PEFT LoRA r=8": Plan(same_as="LoRA r=8"),
    "PEFT IA3": Plan(same_as="IA3"),
})
SMOKE = Profile("smoke", {
    "LoRA r=8": Plan(grid=(3e-3, 1e-2)),
    "prefix": Plan(grid=(3e-3, 1e-2), long_steps=30, long_lrs=(3e-3,), long_eval_every=10),
    "IA3": Plan(grid=(1e-1, 3e-1)),
    "PEFT LoRA r=8": Plan(same_as="LoRA r=8"),
}, steps=12, n_val=40, n_test=40, eval_every=4, heldout_n=20, extend_steps=20, timing_repeats=2, widen=1)
PROFILES = {p.name: p for p in (FULL, SMOKE)}


def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", flush=True)


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:  # platform.processor() is empty on many Linux systems; the kernel's CPU table names the model
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def environment(argv: list[str]) -> dict:
    """Who made the file: command, commit, library versions, threads, machine, date, load."""
    import peft
    import transformers
    return {"command": "python -m peft_lab.benchmarks.head_to_head " + " ".join(argv),
            "commit": _git_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads(),
            "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, {platform.system()}",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_start": _load()}


class _Setting:
    """Notebook 06's data and base model, loaded once."""

    def __init__(self, p: Profile):
        self.base, self.tok = load_base_model("tiny", device="cpu")
        self.train = encode_task(generate_task(p.n_train, seed=501, num_clauses=p.num_clauses), self.tok)
        self.val = generate_task(p.n_val, seed=502, num_clauses=p.num_clauses)
        self.test = generate_task(p.n_test, seed=503, num_clauses=p.num_clauses)
        self.heldout = load_heldout(p.heldout_n)
        self.batch = collate(self.train[:p.batch_size], self.tok.eos_token_id)


def _train(s: _Setting, p: Profile, name: str, lr: float, seed: int, steps: int, eval_every: int):
    r = compare.run(name, s.base, s.tok, s.train, s.val, lr=lr, seed=seed, steps=steps,
                    batch_size=p.batch_size, eval_every=eval_every, keep_model=True)
    rec = {"lr": lr, "seed": seed, "steps": steps, "eval_step": list(r.history.eval_step),
           "val_acc": [round(m, 4) for m in r.history.metric], "final_val_acc": round(r.accuracy, 4),
           "val_loss": round(compare.answer_loss(r.model, s.tok, s.val), 5),
           "ppl_on": round(perplexity(r.model, s.tok, s.heldout), 4),
           "train_s": round(r.history.seconds, 1),
           "steps_to": {f"{t:g}": compare.steps_to_reach(r.history, t) for t in p.targets}}
    _log(f"{name:>14} lr {lr:g} seed {seed} {steps} steps: val {r.accuracy:.1%}, loss {rec['val_loss']:.3f}, "
         f"ppl on {rec['ppl_on']:.1f}, {rec['train_s']:.0f} s")
    return rec, r


def _finish(s: _Setting, rec: dict, r, off: bool) -> dict:
    rec["test_acc"] = round(evaluate_task(r.model, s.tok, s.test)["accuracy"], 4)
    if off:
        rec["ppl_off"] = round(compare.forgetting(r.model, s.tok, s.heldout)["off"], 4)
        if math.isnan(rec["ppl_off"]):
            rec["ppl_off"] = None
    return rec


def _beyond(lrs: list[float], low: bool) -> float:
    """The next rate past the low or high edge of ``lrs`` on the grids' own 1–3–10 ladder (a factor ~3)."""
    x = min(lrs) if low else max(lrs)
    exp = math.floor(math.log10(x) + 1e-9)
    ladder = [m * 10.0 ** e for e in (exp - 1, exp, exp + 1) for m in (1, 3)]
    nxt = max(v for v in ladder if v < x * 0.99) if low else min(v for v in ladder if v > x * 1.01)
    return float(f"{nxt:.3g}")


def _grid_then_seeds(s, p, name, lrs, steps, eval_every) -> dict:
    """Seed 0 at every rate, the lowest validation loss chosen — widened past an edge while the choice sits on
    it (``p.widen`` times at most) — then the other seeds at that rate."""
    runs = {lr: _train(s, p, name, lr, p.seeds[0], steps, eval_every) for lr in lrs}
    chosen, edge = compare.pick_lr({lr: rec["val_loss"] for lr, (rec, _) in runs.items()})
    added = []
    while edge and len(runs) > 1 and len(added) < p.widen:
        lr = _beyond(list(runs), low=chosen == min(runs))
        added.append(lr)
        _log(f"{name:>14}: best rate {chosen:g} at the edge of {sorted(runs)}; adding {lr:g}")
        runs[lr] = _train(s, p, name, lr, p.seeds[0], steps, eval_every)
        chosen, edge = compare.pick_lr({lr: rec["val_loss"] for lr, (rec, _) in runs.items()})
    grid = [runs[lr][0] for lr in sorted(runs)]
    rec0, r0 = runs[chosen]
    seeds = [_finish(s, rec0, r0, off=True)]
    del runs, r0
    for seed in p.seeds[1:]:
        rec, r = _train(s, p, name, chosen, seed, steps, eval_every)
        seeds.append(_finish(s, rec, r, off=False))
    return {"steps": steps, "lrs": sorted(rec["lr"] for rec in grid), "widened": added, "chosen_lr": chosen,
            "edge": edge and len(grid) > 1, "grid": grid, "seeds": seeds}


def around(lr: float) -> tuple[float, float, float]:
    """``lr`` and its neighbours on the grids' 1–3–10 ladder: the long-budget grid of a method that 300 steps
    did not bring to 95%, centred on its 300-step choice."""
    return (_beyond([lr], low=True), lr, _beyond([lr], low=False))


def long_view(s: _Setting, p: Profile, name: str, chosen_lr: float) -> dict:
    """The equal-accuracy view of a method that misses 95% within ``p.steps`` in some seed. Every such method is
    treated alike: a longer budget (its plan's ``long_steps``, else ``p.extend_steps``), a grid of rates on seed 0
    at that budget (its plan's ``long_lrs``, else :func:`around` its 300-step choice; widened at an edge), the
    lowest validation loss chosen, then the other seeds at that rate."""
    plan = p.plan[name]
    steps = plan.long_steps or p.extend_steps
    lrs = plan.long_lrs or around(chosen_lr)
    view = _grid_then_seeds(s, p, name, lrs, steps, plan.long_eval_every if plan.long_steps else p.eval_every)
    return {"source": "long budget", **view}


def _reached_all(view: dict, target: float) -> bool:
    return all(r["steps_to"][f"{target:g}"] is not None for r in view["seeds"])


def cost(s: _Setting, p: Profile, names: list[str]) -> dict:
    """Trainable parameters, memory of one training step (tensor accounting) and the median ms of a training
    step, all methods timed in alternation on the same batch of 16 reviews."""
    out, steps = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = compare.METHODS[name].apply(copy.deepcopy(s.base), s.tok)
        mem = measure_memory(model, s.batch)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(**s.batch).loss.backward()
            opt.step()
        steps[name] = step
        quantized = sum(layer.nf4.numel for _, layer in nf4_layers(model))   # QLoRA's NF4 weights are buffers
        out[name] = {"trainable": sum(q.numel() for q in params),
                     "total": sum(q.numel() for q in model.parameters()) + quantized,
                     "memory_mib": {k: round(v / MiB, 3) for k, v in mem.items()}}
    ms = time_fn(steps, repeats=p.timing_repeats, warmup=2)
    for name in names:
        out[name]["ms_per_step"] = round(1000 * ms[name], 2)
    return out


def _method(s: _Setting, p: Profile, name: str, chosen: dict[str, float], start: float,
            max_minutes: float | None) -> tuple[dict, dict, str | None]:
    """One method's two views (and why its optional runs were skipped, if they were). ``chosen`` holds the
    rates already chosen for the methods a ``same_as`` plan refers to."""
    plan, top = p.plan[name], max(p.targets)
    if plan.same_as:
        lr = chosen[plan.same_as]
        rec, r = _train(s, p, name, lr, p.seeds[0], p.steps, p.eval_every)
        eb = {"steps": p.steps, "lrs": [lr], "chosen_lr": lr, "edge": False, "same_as": plan.same_as,
              "grid": [], "seeds": [_finish(s, rec, r, True)]}
        return eb, {"source": "same as " + plan.same_as}, None
    eb = _grid_then_seeds(s, p, name, plan.grid, p.steps, p.eval_every)
    chosen[name] = eb["chosen_lr"]
    if _reached_all(eb, top):
        return eb, {"source": "equal budget", "steps": eb["steps"], "chosen_lr": eb["chosen_lr"],
                    "seeds": eb["seeds"]}, None
    if plan.long_steps or max_minutes is None or (time.time() - start) / 60 < max_minutes:
        return eb, long_view(s, p, name, eb["chosen_lr"]), None
    return eb, {"source": "not run"}, (f"{name}: misses {top:.0%} within {p.steps} steps; its {p.extend_steps}-step "
                                       f"runs were skipped (over the {max_minutes:g}-minute limit)")


def groups(p: Profile) -> list[list[str]]:
    """The methods in independent groups (a method with the methods whose plan is ``same_as`` it), the longest
    first: the unit of work of one process."""
    roots = [n for n, pl in p.plan.items() if not pl.same_as]
    out = [[r] + [n for n, pl in p.plan.items() if pl.same_as == r] for r in roots]
    return sorted(out, key=lambda g: -(p.plan[g[0]].long_steps or 0))


_SETTING: dict[str, _Setting] = {}


def _run_group(job: tuple[str, list[str], float, float | None]) -> dict[str, tuple]:
    """Worker: train one group of methods in this process, one thread (so every run computes the same numbers
    whichever process it lands in)."""
    profile, names, start, max_minutes = job
    torch.set_num_threads(1)
    _quiet()
    p = PROFILES[profile]
    if profile not in _SETTING:                                # loaded once per process
        _SETTING[profile] = _Setting(p)
    s = _SETTING[profile]
    chosen: dict[str, float] = {}
    return {name: _method(s, p, name, chosen, start, max_minutes) for name in names}


def run_profile(p: Profile, argv: list[str], out: Path | None, max_minutes: float | None = None,
                jobs: int = 1) -> dict:
    """Run profile ``p`` with ``jobs`` processes of one thread each (the groups of :func:`groups` are spread
    over them), then time every method's step in alternation with nothing else running. The file is rewritten
    after every group, so a stopped run leaves what it did."""
    start = time.time()
    torch.set_num_threads(1)
    res = {"environment": {**environment(argv), "jobs": jobs}, "complete": False,
           "setting": {k: v for k, v in asdict(p).items() if k != "plan"},
           "plan": {n: asdict(pl) for n, pl in p.plan.items()}, "methods": list(p.plan),
           "criterion": "lowest validation loss on the answer token (compare.answer_loss), seed 0",
           "equal_budget": {}, "equal_accuracy": {}, "skipped": []}
    save = (lambda: write_text_atomic(out, json.dumps(res, indent=1) + "\n")) if out else (lambda: None)
    s = _Setting(p)
    res["base"] = {"heldout_ppl": round(perplexity(s.base, s.tok, s.heldout), 4),
                   "zero_shot_test_acc": round(evaluate_task(s.base, s.tok, s.test)["accuracy"], 4)}
    work = [(p.name, g, start, max_minutes) for g in groups(p)]
    done: dict[str, tuple] = {}

    def collect(part: dict) -> None:
        done.update(part)
        order = [n for n in p.plan if n in done]               # the file keeps the plan's order
        res["equal_budget"] = {n: done[n][0] for n in order}
        res["equal_accuracy"] = {n: done[n][1] for n in order}
        res["skipped"] = [done[n][2] for n in order if done[n][2]]
        save()

    if jobs == 1:
        _SETTING[p.name] = s
        for job in work:
            collect(_run_group(job))
    else:  # spawn, not fork: a forked copy of a process that already ran torch can deadlock in its thread pools
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for part in pool.imap_unordered(_run_group, work):
                collect(part)
    res["environment"]["minutes_training"] = round((time.time() - start) / 60, 1)
    res["environment"]["load_after_training"] = _load()
    res["cost"] = cost(s, p, list(p.plan))                      # alone on the machine: the workers are gone
    _log("step times (ms): " + ", ".join(f"{n} {c['ms_per_step']}" for n, c in res["cost"].items()))
    res["environment"].update(load_end=_load(), minutes=round((time.time() - start) / 60, 1))
    res["complete"] = True
    save()
    _log(f"done in {res['environment']['minutes']} min")
    return res


def retime(path: Path, argv: list[str]) -> dict:
    """Measure the step times (and memory) of the methods in the results file at ``path`` again and write them
    into it, with when, under what load and by which command: timing needs an idle machine, training does not,
    so a profile trained while the machine was busy can be timed once it is idle."""
    res = json.loads(Path(path).read_text())
    p = PROFILES[res["setting"]["name"]]
    torch.set_num_threads(1)
    s = _Setting(p)
    load = _load()
    res["cost"] = cost(s, p, res["methods"])
    res["environment"]["timing"] = {"command": "python -m peft_lab.benchmarks.head_to_head " + " ".join(argv),
                                    "commit": _git_commit(), "torch": torch.__version__, "threads": 1,
                                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                    "load_start": load, "load_end": _load()}
    write_text_atomic(Path(path), json.dumps(res, indent=1) + "\n")
    _log("step times (ms): " + ", ".join(f"{n} {c['ms_per_step']}" for n, c in res["cost"].items()))
    return res


def _run_long(job: tuple[str, str, float]) -> tuple[str, dict]:
    """Worker of :func:`redo_long`: one method's long-budget view, in this process, one thread."""
    profile, name, chosen_lr = job
    torch.set_num_threads(1)
    _quiet()
    p = PROFILES[profile]
    if profile not in _SETTING:
        _SETTING[profile] = _Setting(p)
    return name, long_view(_SETTING[profile], p, name, chosen_lr)


def redo_long(path: Path, names: list[str], argv: list[str], jobs: int = 1) -> dict:
    """Run the long-budget view (:func:`long_view`) of ``names`` again into the results file at ``path``, in
    place, from each method's committed 300-step choice: the rest of the file is left as it is (every run is
    deterministic on one thread, so those runs would come out the same). The file records the re-run under
    ``environment.long_rerun`` and is rewritten after each method, with ``complete`` false until all are done."""
    res = json.loads(Path(path).read_text())
    p = PROFILES[res["setting"]["name"]]
    unknown = [n for n in names if n not in res["equal_budget"] or p.plan[n].same_as]
    if unknown:
        raise ValueError(f"no trained method {unknown} in {path}")
    start = time.time()
    res["complete"] = False
    res["environment"]["long_rerun"] = {
        "command": "python -m peft_lab.benchmarks.head_to_head " + " ".join(argv), "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "methods": list(names), "load_start": _load(), "jobs": jobs, "done": []}
    save = lambda: write_text_atomic(Path(path), json.dumps(res, indent=1) + "\n")
    save()
    work = [(p.name, n, res["equal_budget"][n]["chosen_lr"]) for n in names]

    def collect(item: tuple[str, dict]) -> None:
        name, view = item
        res["equal_accuracy"][name] = view
        res["environment"]["long_rerun"]["done"].append(name)
        if set(res["environment"]["long_rerun"]["done"]) == set(names):
            res["environment"]["long_rerun"]["minutes"] = round((time.time() - start) / 60, 1)
            res["complete"] = True
        save()

    if jobs == 1:
        for job in work:
            collect(_run_long(job))
    else:  # spawn, as in run_profile
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            for item in pool.imap_unordered(_run_long, work):
                collect(item)
    _log(f"long-budget views of {', '.join(names)} done in {(time.time() - start) / 60:.1f} min")
    return res


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    import transformers
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("PEFT_LAB_QUIET", "1")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"write the results here (e.g. {RESULTS})")
    ap.add_argument("--smoke", action="store_true", help="a few steps of two methods: checks the plumbing")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="skip the optional longer runs of fast methods once this much time has passed")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes of one thread each (default: one per CPU); the numbers do not depend on it")
    ap.add_argument("--retime", action="store_true",
                    help="only measure the step times of the results file (--out or the committed one) again, "
                         "in place: for a profile trained on a busy machine, timed once it is idle")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite the README section and its figure from the results file (--out or the committed one)")
    ap.add_argument("--redo-long", nargs="+", metavar="METHOD", default=None,
                    help="only run these methods' long-budget views again, into the results file (--out or the "
                         "committed one), in place")
    args = ap.parse_args(argv)
    if args.readme:
        from .head_to_head_report import write_readme
        write_readme(args.out or RESULTS)
        return
    _quiet()
    if args.redo_long:
        redo_long(args.out or RESULTS, args.redo_long, argv, args.jobs or 1)
        return
    if args.retime:
        retime(args.out or RESULTS, argv)
        return
    p = SMOKE if args.smoke else FULL
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, len(groups(p))))
    run_profile(p, argv, args.out, args.max_minutes, jobs)


if __name__ == "__main__":
    main()
