"""Run notebooks headless many times, in parallel processes, and report every run's wall time.

    python -m peft_lab.benchmarks.notebook_stress notebooks/06_comparison.ipynb --runs 20 --jobs 2 \
        --model tiny-llama --timeout 120 --dump-after 100

A stress loop for the notebook runner (:mod:`peft_lab.run_notebooks`): a run that waits on a message that
never comes shows up as a run far slower than the rest. ``--dump-after S`` runs ``py-spy dump`` on the
client process and on its kernel when a run has taken S seconds, so the report shows where each side waits
(py-spy must be on ``PATH``; without it the dump says so). Each process runs one thread (``OMP_NUM_THREADS=1``),
as the test command does. Prints one line per run and a summary: count, slowest, median, runs over the limit.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path


def _dump(seconds: float, out: Path, tag: str) -> None:
    """py-spy of this process and its children, written to ``out``."""
    import psutil
    me = psutil.Process()
    lines = [f"# {tag}: still running after {seconds:.0f} s"]
    spy = shutil.which("py-spy")
    for proc in [me, *me.children(recursive=True)]:
        lines.append(f"## pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
        if spy is None:
            lines.append("py-spy is not on PATH")
            continue
        res = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
        lines.append(res.stdout + res.stderr)
    out.write_text("\n".join(lines) + "\n")


def synthetic_notebook(cells: int, folder: Path) -> Path:
    """A notebook of ``cells`` tiny cells: mostly prints, every 10th a figure, every 10th a widget."""
    import nbformat
    folder.mkdir(parents=True, exist_ok=True)
    code = ["import sys\nimport ipywidgets as widgets\nimport matplotlib.pyplot as plt\n"
            "from IPython.display import display"]
    kinds = ["print({i})", "plt.figure(figsize=(1, 1)); plt.plot([0, {i}]); plt.show()",
             "display(widgets.interactive(lambda n: print(n), n=widgets.IntSlider(value={i}, max=1000)))"]
    for i in range(cells):   # mostly prints; every 10th a figure, every 10th a widget (comm messages)
        code.append(kinds[0 if i % 10 > 1 else 1 + i % 10].format(i=i))
    path = folder / f"synthetic_{cells}.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in code]), path)
    return path


def _one(args: tuple) -> dict:
    i, path, timeout, dump_after, dump_dir = args
    from ..run_notebooks import execute
    timer = None
    if dump_after:
        timer = threading.Timer(dump_after, _dump, (dump_after, Path(dump_dir) / f"run{i:03d}.txt",
                                                    f"run {i} of {path}"))
        timer.daemon = True
        timer.start()
    start = time.perf_counter()
    _, summary = execute(Path(path), timeout=timeout)
    if timer is not None:
        timer.cancel()
    return {"run": i, "seconds": round(time.perf_counter() - start, 1), "status": summary["status"],
            "error": summary.get("error", "")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--synthetic", type=int, default=0,
                    help="instead: a generated notebook of this many tiny cells (prints, figures, widgets), "
                         "which exchanges far more kernel messages per second than a course notebook")
    ap.add_argument("--runs", type=int, default=20, help="executions in all (the notebooks in turn)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per cell")
    ap.add_argument("--model", default=None, help="PEFT_LAB_MODEL for the kernels (e.g. tiny-llama)")
    ap.add_argument("--dump-after", type=float, default=0, help="py-spy dump a run still going after S seconds")
    ap.add_argument("--dump-dir", type=Path, default=Path("stress-dumps"))
    args = ap.parse_args(argv)
    if args.runs < 1 or args.jobs < 1:
        ap.error("--runs and --jobs must be at least 1")
    if args.synthetic:
        args.notebooks = [synthetic_notebook(args.synthetic, args.dump_dir)]
    if not args.notebooks:
        ap.error("give notebooks or --synthetic N")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("PEFT_LAB_PROFILE", "quick")
    if args.model:
        os.environ["PEFT_LAB_MODEL"] = args.model
    if args.dump_after:
        args.dump_dir.mkdir(parents=True, exist_ok=True)
    work = [(i, str(args.notebooks[i % len(args.notebooks)].resolve()), args.timeout, args.dump_after,
             str(args.dump_dir)) for i in range(args.runs)]
    start, rows = time.perf_counter(), []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(_one, work):
            rows.append(row)
            print(f"run {row['run']:3d}: {row['status']} in {row['seconds']:6.1f} s {row['error']}", flush=True)
    secs = sorted(r["seconds"] for r in rows)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} runs in {time.perf_counter() - start:.0f} s with {args.jobs} processes: "
          f"median {statistics.median(secs):.1f} s, slowest {secs[-1]:.1f} s, fastest {secs[0]:.1f} s, "
          f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
