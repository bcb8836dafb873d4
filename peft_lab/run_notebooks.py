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
from queue import Empty

import nbformat
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from traitlets import Type

from .paths import write_text_atomic
from .results import ENV_VAR, FIGURES_VAR

ROOT = Path(__file__).resolve().parent.parent
QUIET_VAR = "PEFT_LAB_QUIET"  # read by peft_lab.train: no tqdm bar


def all_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").rglob("*.ipynb"))


POLL_SLICE = 0.5   # seconds: the longest a message that has arrived can wait unread (SlicedKernelClient)


class _SlicedChannel(AsyncZMQSocketChannel):
    """A client channel whose ``get_msg`` waits in slices of :data:`POLL_SLICE` seconds.

    pyzmq's asyncio ``poll`` can miss the wake-up for a message that has already arrived (the socket's
    edge-triggered file descriptor fired while nobody watched); the message is then found only when the poll
    times out. nbclient waits for a cell's reply with one poll as long as the whole cell timeout, so a missed
    wake-up held a finished cell for the full timeout (600 s); then the reply was read and the run continued
    without an error. On the output channel the wait has no timeout at all. Each slice ends with a direct check of
    the socket, so a missed wake-up costs at most one slice."""

    async def get_msg(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = POLL_SLICE if left is None else min(POLL_SLICE, left)
            if await self.socket.poll(int(step * 1000)):
                return await self._recv()
            if left is not None and left <= step:
                raise Empty


class SlicedKernelClient(AsyncKernelClient):
    """nbclient's kernel client, its shell and output channels waiting in slices (:class:`_SlicedChannel`)."""

    shell_channel_class = Type(_SlicedChannel)
    iopub_channel_class = Type(_SlicedChannel)


def _kernel_config(tmp: str):
    """Kernel over local sockets in ``tmp`` where the OS has them (no "running over TCP" warning), else TCP;
    the client waits in slices (:class:`SlicedKernelClient`)."""
    from traitlets.config import Config

    client = {"client_class": f"{__name__}.SlicedKernelClient"}
    if os.name == "posix":
        return Config({"KernelManager": {"transport": "ipc", "ip": str(Path(tmp) / "kernel"), **client}})
    return Config({"KernelManager": client})


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what changes on every run without telling the reader anything: execution timestamps, widget state."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def execute(path: Path, timeout: int = 600, quiet: bool = True) -> tuple[nbformat.NotebookNode, dict]:
    """Run ``path`` top to bottom on a fresh kernel; return the executed, :func:`clean` notebook and a summary.

    ``timeout``: seconds a cell may run without its reply. A cell that errs, times out or kills the kernel
    ends the run with ``status`` "error" and an ``error`` that names the cell (0-based over all cells)."""
    nb = nbformat.read(path, as_version=4)
    saved_env = {k: os.environ.get(k) for k in (ENV_VAR, QUIET_VAR)}
    with tempfile.TemporaryDirectory() as tmp:
        results_file = Path(tmp) / "results.json"
        os.environ[ENV_VAR] = str(results_file)  # the kernel inherits this process's environment
        if quiet:
            os.environ[QUIET_VAR] = "1"
        current: dict[str, int] = {}   # the index of the cell running now, for a message that names it

        def note(cell, cell_index):
            current["cell"] = cell_index
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=_kernel_config(tmp),
                                resources={"metadata": {"path": str(path.parent)}}, on_cell_execute=note)
        start, error = time.perf_counter(), None
        try:
            client.execute()
        except CellExecutionError as err:
            error = str(err).splitlines()[-1] if str(err) else type(err).__name__
        except CellTimeoutError:   # a stalled kernel or a cell slower than the course allows: say which
            cell = current.get("cell")
            first = nb.cells[cell].source.splitlines()[:1] if cell is not None else []
            error = f"cell {cell} gave no reply within {timeout} s ({first[0][:60] if first else ''!r})"
        except DeadKernelError as err:
            error = f"the kernel died during cell {current.get('cell')}: {err}"
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
        if args.inplace:  # atomic: an interrupted run never leaves a half-written notebook
            write_text_atomic(path, nbformat.writes(nb) + "\n")
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
        write_text_atomic(args.out / "results.json",
                          json.dumps({"environment": meta, "notebooks": summary}, indent=2) + "\n")
        print(f"wrote {args.out / 'results.json'}")
    return 0 if all(s["status"] == "ok" for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
