"""What a student reads: no test or CI machinery in the notebooks, and exercises whose answers are not on screen.

Three guards over the committed notebooks:
- no markdown or output mentions the test suite, CI, commit hashes, load averages or the machine a run was made
  on (how results are refreshed belongs in the README);
- every exercise says its kind and the printed forms of its answer for the notebook's own setting, and none of
  those forms appears in an output of that notebook (an answer on screen can be copied);
- every method notebook has a *predict*, a *build* and a *debug* exercise, and no worked solution repeats three
  lines in a row of a notebook cell (a solution that copies a cell means the exercise could be copied too).
"""
from __future__ import annotations

import re

import nbformat
import pytest

from peft_lab.colab import setup_cell
from peft_lab.exercises import KINDS, exercises
from peft_lab.run_notebooks import ROOT, all_notebooks

STUDENT_NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# A method notebook derives and builds one family of methods; it gets one exercise of each active kind.
METHOD_WORDS = ("lora", "adapters", "prefix", "scale_out", "what_matters")
ACTIVE_KINDS = ("predict", "build", "debug")

FORBIDDEN = {
    r"\btests/|\btest_\w+\.py": "a test file",
    r"\.ci/|\bpytest\b|\bnbval\b|\bthe test command\b": "the test machinery",
    r"\bload average\b": "a load average",
    r"\bcommit\s+[0-9a-f]{7,40}\b|`[0-9a-f]{7,40}`": "a commit hash",
    r"\bshared CPU\b|\bdevelopment run\b|\bnot executed here\b": "a run the notebook does not show",
    r"\bsecond machine of the same kind\b": "the machine a run was made on",
    r"<!--": "an HTML comment (a note to authors)",
}


def _texts(nb):
    """(cell index, where, text) for every markdown cell and every text output."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            yield i, "markdown", cell.source
        for out in cell.get("outputs", []):
            yield i, "output", out.get("text", "") + "".join(
                str(out.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown", "text/html"))


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_no_machinery_in_what_a_student_reads(path):
    nb = nbformat.read(path, as_version=4)
    found = [f"cell {i} ({where}): {what} — {m.group(0)!r}"
             for i, where, text in _texts(nb)
             for pattern, what in FORBIDDEN.items()
             for m in [re.search(pattern, text, flags=re.IGNORECASE)] if m]
    assert not found, f"{path.name} speaks of its own production; move it to the README:\n" + "\n".join(found)


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.name)
def test_exercise_answers_are_not_on_screen(path):
    nb = nbformat.read(path, as_version=4)
    outputs = "\n".join(text for _, where, text in _texts(nb) if where == "output")
    problems = []
    for ex in exercises(path.name[:2]):
        if ex.kind not in KINDS:
            problems.append(f"{ex.id}: no kind (one of {KINDS})")
        if ex.hidden is None:
            problems.append(f"{ex.id}: no hidden= (the printed forms of its answer, [] for code)")
            continue
        problems += [f"{ex.id}: its answer {form!r} is printed by the notebook"
                     for form in ex.hidden() if form and form in outputs]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in STUDENT_NOTEBOOKS if any(w in p.stem for w in METHOD_WORDS)],
                         ids=lambda p: p.name)
def test_method_notebooks_ask_to_predict_build_and_debug(path):
    kinds = {e.kind for e in exercises(path.name[:2])}
    assert set(ACTIVE_KINDS) <= kinds, f"{path.name} has no {sorted(set(ACTIVE_KINDS) - kinds)} exercise"


def _code_lines(cell) -> list[str]:
    """Lines that carry the cell's work: no blanks, comments, imports or one-word lines (and none of the Colab
    setup cell, which every notebook and its solutions share by design)."""
    if cell.source.lstrip().startswith("# Colab only"):
        return []
    keep = []
    for line in cell.source.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", "import ", "from ")) or len(s) < 12:
            continue
        keep.append(s)
    return keep


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_do_not_copy_the_notebook(path):
    solutions = ROOT / "notebooks" / "solutions" / path.name.replace(".ipynb", "_solutions.ipynb")
    nb, sol = nbformat.read(path, as_version=4), nbformat.read(solutions, as_version=4)
    windows = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            lines = _code_lines(cell)
            for k in range(len(lines) - 2):
                windows.setdefault(tuple(lines[k:k + 3]), i)
    copies = []
    for j, cell in enumerate(sol.cells):  # the Colab setup cell is the same in every notebook by design
        if cell.cell_type == "code" and cell.source.strip() != setup_cell().strip():
            lines = _code_lines(cell)
            copies += [f"solution cell {j} repeats notebook cell {windows[w]}: {w[0]!r} …"
                       for k in range(len(lines) - 2) if (w := tuple(lines[k:k + 3])) in windows]
    assert not copies, "\n".join(copies)


PRINT_WIDTH = 110   # the longest printed line a student should have to read (wide tables go out as Markdown)


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_printed_lines_fit_the_page(path):
    """Every line a cell prints (stdout/stderr) is at most PRINT_WIDTH characters: longer lines wrap or scroll
    in Colab and in the rendered course."""
    nb = nbformat.read(path, as_version=4)
    long = [f"cell {i}: {len(line)} characters: {line[:60]!r}…"
            for i, cell in enumerate(nb.cells) for out in cell.get("outputs", []) if out.output_type == "stream"
            for line in out.text.splitlines() if len(line) > PRINT_WIDTH]
    assert not long, f"{path.name} prints lines over {PRINT_WIDTH} characters:\n" + "\n".join(long)
