"""The course machinery: exercises, results record, Colab header, notebook runner, notebook hygiene."""
import json
import re

import nbformat
import pytest

import peft_lab
from peft_lab import check, record
from peft_lab.colab import REPO_URL, badge, repo_urls, retarget, setup_cell
from peft_lab.exercises import exercise, exercises, number
from peft_lab.run_notebooks import ROOT, all_notebooks
from peft_lab.run_notebooks import main as run_main

STUDENT_NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_check_says_right_wrong_and_why(capsys):
    ex = exercises("01")
    assert ex, "notebook 01 has exercises"
    assert check("01.ex1", None) is False
    assert "no answer yet" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="known"):
        check("99.9", 1)
    assert check("01.ex1", "not a number") is False
    assert "could not read" in " ".join(capsys.readouterr().out.split())


def test_exercise_ids_cannot_be_read_as_equation_tags():
    for e in exercises("00") + exercises("01"):
        assert re.fullmatch(r"\d\d\.ex\d+", e.id), e.id


def test_check_accepts_numpy_and_torch_scalars(capsys):
    import numpy as np
    import torch
    for answer in (12, 12.0, np.int64(12), np.float32(12), torch.tensor(12), torch.tensor(12.0)):
        assert check("00.ex1", answer, verbose=False) is True, type(answer)
    assert check("00.ex1", np.int64(16)) is False
    assert "two moments" in " ".join(capsys.readouterr().out.split())  # the known mistake is named
    assert check("00.ex1", np.array([12, 12]), verbose=False) is False  # not a scalar
    assert check("00.ex1", np.bool_(True), verbose=False) is False
    assert check("00.ex1", np.int64(12)) is True
    assert "Right [00.ex1]" in " ".join(capsys.readouterr().out.split())


def test_coding_exercise_runs_the_students_function(capsys):
    state = {"adamw": 8, "sgd_momentum": 4, "sgd": 0}

    def right(n_params, n_trainable, precision, optimizer):
        return (4 * n_params + (4 + state[optimizer]) * n_trainable if precision == "fp32"
                else 2 * n_params + (6 + state[optimizer]) * n_trainable)

    def wrong(n_params, n_trainable, precision, optimizer):
        return 16 * n_params  # ignores the frozen part

    def broken(n_params, n_trainable, precision, optimizer):
        return n_params / 0

    assert check("00.ex5", right) is True
    assert check("00.ex5", np_wrap(right)) is True  # numpy integers back are fine
    assert check("00.ex5", wrong) is False
    assert "no gradient" in " ".join(capsys.readouterr().out.split())
    assert check("00.ex5", broken) is False
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("Not yet [00.ex5]: your code raised ZeroDivisionError") and "of broken" in out
    assert "Traceback" not in out


def np_wrap(fn):
    import numpy as np
    return lambda *a: np.int64(fn(*a))


def test_encode_exercise_grades_against_encode_task(capsys):
    def encode(example, tok):
        p = tok.encode(example["prompt"])
        a = tok.encode(" " + example["answer"]) + [tok.eos_token_id]
        return {"input_ids": p + a, "labels": [-100] * len(p) + a}

    def unmasked(example, tok):
        ids = encode(example, tok)["input_ids"]
        return {"input_ids": ids, "labels": ids}

    assert check("01.ex4", encode) is True
    assert check("01.ex4", unmasked) is False
    assert "-100" in " ".join(capsys.readouterr().out.split())


def test_number_helper_explains_known_mistakes():
    assert number(16, 16)[0]
    ok, why = number(12, 16, mistakes={12: "forgot a moment"})
    assert not ok and why == "forgot a moment"
    ok, why = number(20, 16)
    assert not ok and "too high" in why
    with pytest.raises(TypeError):
        number(True, 1)
    with pytest.raises(ValueError, match="twice"):
        exercise("01.ex1", "duplicate")(lambda a: (True, ""))
    with pytest.raises(ValueError, match="no exercise id=.02.3."):  # old ids read like equation tags: gone
        check("02.3", 1.0)


def test_record_is_a_no_op_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFT_LAB_RESULTS", raising=False)
    assert record("x", 3) == 3
    target = tmp_path / "r.json"
    monkeypatch.setenv("PEFT_LAB_RESULTS", str(target))
    record("a", 1)
    record("b", {"c": 0.5})
    assert json.loads(target.read_text()) == {"a": 1, "b": {"c": 0.5}}
    with pytest.raises(ValueError):
        record("", 1)


def test_runner_collects_status_time_and_records(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import peft_lab\npeft_lab.record('answer', 42)\nprint('hi')")])
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1/0")])
    nbformat.write(good, nbdir / "good.ipynb")
    nbformat.write(bad, nbdir / "bad.ipynb")
    out = tmp_path / "build"
    assert run_main([str(nbdir / "good.ipynb"), str(nbdir / "bad.ipynb"), "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())["notebooks"]
    assert res["good.ipynb"]["status"] == "ok" and res["good.ipynb"]["results"] == {"answer": 42}
    assert res["bad.ipynb"]["status"] == "error" and "ZeroDivisionError" in res["bad.ipynb"]["error"]
    assert (out / "html" / "good.html").is_file() and (out / "notebooks" / "good.ipynb").is_file()
    with pytest.raises(SystemExit):
        run_main([str(nbdir / "good.ipynb")])  # neither --out nor --inplace



def test_runner_names_the_cell_that_gave_no_reply(tmp_path):
    """A cell past the timeout (a stalled kernel looks the same) ends the run at once, naming that cell."""
    from peft_lab.run_notebooks import execute
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# slow"),
                                         nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("import time\ntime.sleep(30)")])
    nbformat.write(nb, tmp_path / "slow.ipynb")
    _, summary = execute(tmp_path / "slow.ipynb", timeout=2)
    assert summary["status"] == "error" and summary["seconds"] < 25
    assert summary["error"].startswith("cell 2 gave no reply within 2 s ('import time')"), summary

def test_retarget_rewrites_badge_and_setup(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(badge("x.ipynb")),
                                         nbformat.v4.new_code_cell(setup_cell())])
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert repo_urls(tmp_path / "x.ipynb") == {REPO_URL}
    retarget("https://github.com/someone/fork", tmp_path)
    assert repo_urls(tmp_path / "x.ipynb") == {"https://github.com/someone/fork"}


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_notebook_hygiene(path):
    """Executed in order, no stored errors, no machine paths, one repository URL (peft_lab.REPO_URL)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert None not in counts, "commit notebooks executed"
    assert counts == sorted(counts), "execution counts out of order: re-run top to bottom"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = path.read_text(encoding="utf-8")
    for bad in ("/work/", "/tmp/", "/root/", "/home/"):
        assert bad not in text, f"machine path {bad} in {path.name}"
    assert repo_urls(path) <= {REPO_URL}


WIDGET_STATE_LIMIT = 20_000  # bytes of saved widget state a notebook may carry
PROGRESS_TEXT = re.compile(r"\d+%\|[^\n|]*\| *\d+/\d+")  # tqdm's text: " 0%|          | 0/150"


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    """No execution timestamps, no bulky widget state, no progress-bar text, no echoed booleans."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    state = nb.metadata.get("widgets")
    if state and len(json.dumps(state)) > WIDGET_STATE_LIMIT:
        problems.append(f"{len(json.dumps(state)):,} bytes of widget state in the notebook metadata")
    for i, cell in enumerate(nb.cells):
        if "execution" in cell.metadata:
            problems.append(f"cell {i}: execution timestamps in its metadata")
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [str(v) for v in out.get("data", {}).values()]
            if any(PROGRESS_TEXT.search(t) for t in texts):
                problems.append(f"cell {i}: progress-bar text in its output")
            if out.output_type == "execute_result" and out.data.get("text/plain") in ("True", "False", "None"):
                problems.append(f"cell {i}: an echoed {out.data['text/plain']} (end the line with ';')")
        code = [ln for ln in cell.source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if "# NBVAL_CHECK_OUTPUT" in cell.source and code and code[-1].split("#")[0].rstrip().endswith(";"):
            # nbval runs cells without storing history, and IPython then ignores the ';': the value is
            # printed and the cell fails. Assign it (`_ = ...`) or assert it instead.
            problems.append(f"cell {i}: a checked cell ends in ';' (nbval prints the value anyway)")
    assert not problems, (f"{path.relative_to(ROOT)}: " + "; ".join(problems)
                          + " — re-execute with python -m peft_lab.run_notebooks --inplace")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_solutions_have_badge_and_setup(path):
    nb = nbformat.read(path, as_version=4)
    assert badge(f"solutions/{path.name}") in nb.cells[0].source
    assert any(c.cell_type == "code" and c.source.strip() == setup_cell().strip() for c in nb.cells)


@pytest.mark.parametrize("path", STUDENT_NOTEBOOKS, ids=lambda p: p.name)
def test_student_notebook_pattern(path):
    nb = nbformat.read(path, as_version=4)
    assert badge(path.name) in nb.cells[0].source
    assert any(c.cell_type == "code" and c.source.strip() == setup_cell().strip() for c in nb.cells)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "a tagged parameters cell"
    assert any("# NBVAL_CHECK_OUTPUT" in c.source for c in nb.cells if c.cell_type == "code")
    number_ = path.name[:2]
    ids = {e.id for e in exercises(number_)}
    used = {i for c in nb.cells if c.cell_type == "code" for i in ids if f'check("{i}"' in c.source}
    assert ids and used == ids, "every exercise of the notebook is posed in it"
    solutions = ROOT / "notebooks" / "solutions" / path.name.replace(".ipynb", "_solutions.ipynb")
    assert solutions.is_file(), f"worked solutions for {path.name} live in {solutions.name}"
    assert any(c.cell_type == "markdown" and "## Exercises" in c.source and solutions.name in c.source
               for c in nb.cells), "an '## Exercises' section naming the solutions notebook"
    sol = nbformat.read(solutions, as_version=4)
    printed = "".join(o.get("text", "") for c in sol.cells if c.cell_type == "code" for o in c.outputs)
    for i in ids:
        assert f"Right [{i}]" in printed, f"solution of {i} checks as right"


def test_public_names():
    for name in ("load_base_model", "build_from_config", "count_parameters", "print_trainable_parameters",
                 "train", "measure_memory", "check", "REPO_URL"):
        assert hasattr(peft_lab, name), name
