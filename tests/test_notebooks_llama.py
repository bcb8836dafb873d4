"""Every notebook runs top to bottom on the second shipped model, tiny-llama.

nbval checks the committed outputs on the default model "tiny"; this is a plain execution with
``PEFT_LAB_MODEL=tiny-llama`` (each notebook's ``MODEL_NAME``), the quick profile of notebook 06 and every
training run capped short (``MAX_STEPS``), which fails on any cell that raises. Cells that only make sense for
GPT-2 (AdapterHub's reference files) skip themselves. The executed copies are written under pytest's temporary
folder, for reading when one fails.
Marked ``notebooks``: the second environment (``.ci/floor``) deselects it, like nbval, which it does not run.
"""
import nbformat
import pytest

from peft_lab.run_notebooks import ROOT, execute

# The notebooks whose parameters cell reads the model name (every method notebook; test_arch checks that each
# one does). The solutions load "tiny" by name, so on tiny-llama they would run exactly what nbval runs.
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if "arch.model_name(" in p.read_text())
assert [p.name[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09"], NOTEBOOKS

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


# Seconds a cell may take: far above any cell of the course on a 2-core CPU, far below nbclient's default of
# 600 s; a cell that gives no reply within it fails the run with an error naming the cell.
CELL_TIMEOUT = 120


# The short profile: every training run capped at this many steps (peft_lab.train's PEFT_LAB_MAX_STEPS). These
# runs show that every cell runs on a LLaMA-family model; nbval checks the numbers, on tiny. Notebook 01 asserts
# that full fine-tuning beats zero-shot by 20 points, which takes about 60 steps on tiny-llama.
MAX_STEPS = {"01": 60}
DEFAULT_MAX_STEPS = 20


def _run_on_tiny_llama(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_MODEL", "tiny-llama")     # the kernel inherits this process's environment
    monkeypatch.setenv("PEFT_LAB_PROFILE", "quick")
    monkeypatch.setenv("PEFT_LAB_MAX_STEPS", str(MAX_STEPS.get(path.name[:2], DEFAULT_MAX_STEPS)))
    nb, summary = execute(path, timeout=CELL_TIMEOUT)
    nbformat.write(nb, tmp_path / path.name)
    errors = [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, cell in enumerate(nb.cells)
              if cell.cell_type == "code" for out in cell.get("outputs", []) if out.output_type == "error"]
    assert summary["status"] == "ok" and not errors, (path.name, summary.get("error"), errors,
                                                      str(tmp_path / path.name))


# One test class per notebook: the test command spreads tests over two processes by class or module
# (pytest-xdist's --dist loadscope, which keeps each nbval notebook in one process), so each notebook here can
# run beside another instead of all of them queueing in one process. (pytest-xdist's groups would say this
# more directly, but --dist loadgroup did not keep nbval's cells together in one process here.)
for _path in NOTEBOOKS:
    _name = "TestTinyLlama_" + _path.stem

    def _test(self, tmp_path, monkeypatch, path=_path):
        _run_on_tiny_llama(path, tmp_path, monkeypatch)

    _test.__name__ = "test_runs_top_to_bottom"
    globals()[_name] = type(_name, (), {"test_runs_top_to_bottom": _test})
