"""Exercises with self-checking answers: ``peft_lab.check("00.ex1", answer)`` says right or wrong, and why.

Each notebook ends with exercises; their checkers live in ``nbNN.py`` beside this file (one module per
notebook), worked solutions in ``notebooks/solutions/``. A checker returns ``(correct, explanation)``; it
computes the expected answer from the same formulas the notebook derives rather than storing it.

Exercise ids read ``"NN.exK"`` (notebook NN, exercise K), so they cannot be mistaken for an equation tag
such as (02.3); ids of the form "NN.K" are not accepted (they read like equation tags). An answer is a
number (Python, NumPy or a 0-d torch tensor), a string, or — for coding exercises — a function or class
that the checker runs; an error raised by the student's code while it runs becomes "Not yet" naming the
exception.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
import textwrap
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable

Checker = Callable[[Any], "tuple[bool, str]"]


KINDS = ("predict", "build", "debug", "compute")
"""What an exercise asks: *predict* a value before the cell that reveals it, *build* code the notebook did not
write, *debug* a broken snippet, or *compute* a number for a setting the notebook never printed."""


@dataclass(frozen=True)
class Exercise:
    id: str
    question: str
    checker: Checker
    kind: str | None
    hidden: Callable[[], "list[str]"] | None
    """The ways the answer for the notebook's own setting would be printed (e.g. ``["65,536", "65536"]``);
    none may appear in the notebook's outputs, so the answer cannot be copied from the screen. ``[]`` for an
    exercise whose answer is code."""


_REGISTRY: dict[str, Exercise] = {}


class StudentCodeError(Exception):
    """The student's function or class raised while a checker ran it (see :func:`run_student`)."""


def exercise(id: str, question: str, *, kind: str | None = None, hidden: Callable[[], "list[str]"] | None = None):
    """Decorator registering ``checker(answer) -> (correct, why)`` as exercise ``id`` (``"NN.exK"``), of one
    of :data:`KINDS`, with ``hidden()`` the printed forms of its answer that the notebook must not show (both are
    required of every exercise by tests/test_notebook_text.py)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if hidden is not None and not callable(hidden):
        raise TypeError(f"hidden must be a function returning the answer's printed forms, got {hidden!r}")

    def wrap(fn: Checker) -> Checker:
        if id in _REGISTRY:
            raise ValueError(f"exercise {id!r} is registered twice")
        _REGISTRY[id] = Exercise(id, question, fn, kind, hidden)
        return fn
    return wrap


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("nb"):
            importlib.import_module(f"{__name__}.{mod.name}")


def exercises(notebook: str | None = None) -> list[Exercise]:
    """All registered exercises, or those of one notebook (``"00"``, ``"01"``, ...), in id order."""
    _load_all()
    found = [e for k, e in sorted(_REGISTRY.items()) if notebook is None or k.split(".")[0] == notebook]
    return found


def as_number(answer: Any) -> Any:
    """A NumPy scalar, a one-element array or a 0-d torch tensor as a Python number; anything else unchanged
    (:func:`peft_lab.validate.as_python_number`, which the package's own arguments go through)."""
    from ..validate import as_python_number
    return as_python_number(answer, one_element=True)


def run_student(fn: Callable, *args, forbid: tuple = (), **kwargs):
    """Call the student's ``fn``; an exception it raises becomes :class:`StudentCodeError` naming it. While it
    runs, the package functions in ``forbid`` (the ones that answer the exercise) refuse to run, so handing in
    ``peft_lab``'s own function does not pass a *build* exercise."""
    if any(fn is f for f in forbid):
        raise StudentCodeError(f"{fn.__name__} is the package's own answer, the one this exercise asks you to write")
    try:
        with forbidden(*forbid):
            return fn(*args, **kwargs)
    except Exception as err:  # any error in the student's code is feedback, not a crash of the checker
        raise StudentCodeError(_describe(err, fn)) from err


@contextmanager
def forbidden(*functions: Callable):
    """Inside the block each of ``functions`` (package functions) raises, under its module's name and under
    ``peft_lab``'s own, with a message that the exercise asks the student to write it."""
    import sys

    import peft_lab
    swaps = []
    for fn in functions:
        def refuse(*args, _name=fn.__name__, **kwargs):
            raise RuntimeError(f"{_name} is what this exercise asks you to write: compute it yourself")
        for owner in (sys.modules[fn.__module__], peft_lab):
            if getattr(owner, fn.__name__, None) is fn:
                swaps.append((owner, fn.__name__, fn))
                setattr(owner, fn.__name__, refuse)
    try:
        yield
    finally:
        for owner, name, fn in swaps:
            setattr(owner, name, fn)


def first_failure(cases, check_case: Callable, seed: int):
    """``check_case(case, seed=seed + i)`` for each case, with the notebook's random stream left untouched
    (grading draws its own weights); the first reason a case gives for failing, or ``None`` when all pass."""
    import torch
    with torch.random.fork_rng(devices=[]):
        for i, case in enumerate(cases):
            reason = check_case(case, seed=seed + i)
            if reason is not None:
                return reason
    return None


def _describe(err: BaseException, fn: Any) -> str:
    """``"ZeroDivisionError: division by zero (line 3 of my_func)"`` — the deepest frame of the student's code."""
    where = ""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__init__", None), "__code__", None)
    if code is not None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == code.co_filename]
        if frames:
            where = f" (line {frames[-1].lineno} of {frames[-1].name})"
    return f"{type(err).__name__}: {err}{where}"


#: The longest line a notebook prints (course rule); check() wraps its verdict to it.
PRINT_WIDTH = 110


def check(id: str, answer: Any, verbose: bool = True) -> bool:
    """Check ``answer`` for exercise ``id``; print "Right"/"Not yet" with the reason; return the verdict."""
    _load_all()
    if not isinstance(id, str):
        raise TypeError(f"id must be the exercise's id as a string, e.g. check(\"02.ex2\", answer), got {id!r}")
    key = id
    if key not in _REGISTRY:
        raise ValueError(f"no exercise id={id!r}; known: {sorted(_REGISTRY)}")
    if answer is None or answer is ...:
        ok, why = False, "no answer yet: replace the placeholder with your answer and run the cell again."
    elif _REGISTRY[key].kind in ("build", "debug") and not callable(answer):
        ok, why = False, (f"this exercise's answer is code: pass your function or class itself, e.g. "
                          f"check({id!r}, my_function), not {type(answer).__name__} it returned")
    else:
        try:
            ok, why = _REGISTRY[key].checker(as_number(answer))
        except StudentCodeError as err:
            ok, why = False, f"your code raised {err}"
        except (TypeError, ValueError) as err:  # a malformed answer is a wrong answer with a reason
            ok, why = False, f"could not read that answer ({err})"
        except Exception as err:
            if not callable(answer):
                raise
            ok, why = False, f"running your code raised {_describe(err, answer)}"
    if verbose:
        # wrapped at 110 characters, the longest line a notebook prints (a reason can run to several sentences)
        print(textwrap.fill(f"{'Right' if ok else 'Not yet'} [{id}]: {why}", width=PRINT_WIDTH,
                            break_long_words=False, break_on_hyphens=False))
    return ok


def number(answer: Any, expected: float, *, rel_tol: float = 1e-2, unit: str = "",
           mistakes: dict[float, str] | None = None, explain: str = "") -> tuple[bool, str]:
    """Helper for numeric exercises: accept within ``rel_tol``; name a known mistake if the answer hits one.
    numpy and torch scalars (``np.int64``, ``np.float32``, a 0-d tensor) count as the numbers they hold."""
    answer = as_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, Real):
        raise TypeError(f"expected a number, got {type(answer).__name__}")
    answer = float(answer)
    if math.isclose(answer, expected, rel_tol=rel_tol):
        return True, explain or f"{expected:,g}{unit}"
    for value, reason in (mistakes or {}).items():
        if math.isclose(answer, value, rel_tol=rel_tol):
            return False, reason
    direction = "high" if answer > expected else "low"
    return False, f"{answer:,g}{unit} is too {direction}. {explain}".strip()
