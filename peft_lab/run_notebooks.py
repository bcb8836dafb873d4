"""Execute notebooks headless (README command 1, and how notebooks are re-executed before committing).

    python -m peft_lab.run_notebooks --out build          # every notebook -> build/{notebooks,html}, results
    python -m peft_lab.run_notebooks --inplace notebooks/01_base_model_and_task.ipynb

Each notebook runs on a fresh kernel from its own folder, with ``PEFT_LAB_QUIET=1`` (no progress bars in the
saved outputs; ``--progress`` keeps them). Values the notebook passes to :func:`peft_lab.record` land in
``build/results.json`` with its status and wall time. Saved notebooks carry no per-cell execution timestamps
and no widget state (the widgets' text fallback and each explorer's static figure remain).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from .results import ENV_VAR, FIGURES_VAR

ROOT = Path(__file__).resolve().parent.parent
QUIET_VAR = "PEFT_LAB_QUIET"  # read by peft_lab.train: no tqdm bar


def all_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").rglob("*.ipynb"))


def _kernel_config(tmp: str):
    """Kernel over local sockets in ``tmp`` where the OS has them (no "running over TCP" warning), else TCP."""
    from traitlets.config import Config

    if os.name == "posix":
        return Config({"KernelManager": {"transport": "ipc", "ip": str(Path(tmp) / "kernel")}})
    return Config()


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes on every run without telling the reader anything: execution timestamps, widget state."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def execute(path: Path, timeout: int = 600, quiet: bool = True) -> tuple[nbformat.NotebookNode, dict]:
    """Run ``path`` top to bottom on a fresh kernel; return the executed, :func:`clean` notebook and a summary."""
    nb = nbformat.read(path, as_version=4)
    saved_env = {k: os.environ.get(k) for k in (ENV_VAR, QUIET_VAR)}
    with tempfile.TemporaryDirectory() as tmp:
        results_file = Path(tmp) / "results.json"
        os.environ[ENV_VAR] = str(results_file)  # the kernel inherits this process's environment
        if quiet:
            os.environ[QUIET_VAR] = "1"
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=_kernel_config(tmp),
                                resources={"metadata": {"path": str(path.parent)}})
        start, error = time.perf_counter(), None
        try:
            client.execute()
        except CellExecutionError as err:
            error = str(err).splitlines()[-1] if str(err) else type(err).__name__
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        seconds = time.perf_counter() - start
        recorded = json.loads(results_file.read_text()) if results_file.is_file() else {}
    summary = {"status": "ok" if error is None else "error", "seconds": round(seconds, 1),
               "results": recorded}
    if error:
        summary["error"] = error
    return clean(nb), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook under notebooks/")
    ap.add_argument("--out", type=Path, default=None, help="write executed copies, HTML and results here")
    ap.add_argument("--inplace", action="store_true", help="overwrite the notebooks with executed versions")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--progress", action="store_true", help="keep training progress bars in the outputs")
    args = ap.parse_args(argv)
    if not args.out and not args.inplace:
        ap.error("give --out DIR, --inplace, or both")
    paths = [p.resolve() for p in args.notebooks] or all_notebooks()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    if args.out:  # notebooks save their plots here through peft_lab.save_figure (the kernel inherits it)
        os.environ[FIGURES_VAR] = str((args.out / "figures").resolve())
    summary: dict[str, dict] = {}
    for path in paths:
        name = str(path.relative_to(ROOT / "notebooks")) if path.is_relative_to(ROOT / "notebooks") \
            else path.name
        print(f"{name}: ", end="", flush=True)
        nb, info = execute(path, args.timeout, quiet=not args.progress)
        summary[name] = info
        print(f"{info['status']} in {info['seconds']} s" + (f": {info['error']}" if "error" in info else ""),
              flush=True)
        if args.inplace:
            nbformat.write(nb, path)
        if args.out:
            from nbconvert import HTMLExporter
            (args.out / "notebooks" / Path(name).parent).mkdir(parents=True, exist_ok=True)
            (args.out / "html" / Path(name).parent).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.out / "notebooks" / name)
            html, _ = HTMLExporter().from_notebook_node(nb)
            (args.out / "html" / name).with_suffix(".html").write_text(html, encoding="utf-8")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        import platform
        import torch
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads()}
        (args.out / "results.json").write_text(
            json.dumps({"environment": meta, "notebooks": summary}, indent=2) + "\n")
        print(f"wrote {args.out / 'results.json'}")
    return 0 if all(s["status"] == "ok" for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
