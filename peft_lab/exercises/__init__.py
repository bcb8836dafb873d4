"""Exercises with self-checking answers: ``peft_lab.check("00.1", answer)`` says right or wrong, and why.

Each notebook ends with exercises; their checkers live in ``nbNN.py`` beside this file (one module per
notebook), worked solutions in ``notebooks/solutions/``. A checker returns ``(correct, explanation)``; it
computes the expected answer from the same formulas the notebook derives rather than storing it.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

Checker = Callable[[Any], "tuple[bool, str]"]


@dataclass(frozen=True)
class Exercise:
    id: str
    question: str
    checker: Checker


_REGISTRY: dict[str, Exercise] = {}


def exercise(id: str, question: str):
    """Decorator registering ``checker(answer) -> (correct, why)`` as exercise ``id`` (``"NN.k"``)."""
    def wrap(fn: Checker) -> Checker:
        if id in _REGISTRY:
            raise ValueError(f"exercise {id!r} is registered twice")
        _REGISTRY[id] = Exercise(id, question, fn)
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


def check(id: str, answer: Any, verbose: bool = True) -> bool:
    """Check ``answer`` for exercise ``id``; print "Right"/"Not yet" with the reason; return the verdict."""
    _load_all()
    if not isinstance(id, str):
        raise TypeError(f"id must be the exercise's id as a string, e.g. check(\"02.2\", answer), got {id!r}")
    if id not in _REGISTRY:
        raise KeyError(f"no exercise id={id!r}; known: {sorted(_REGISTRY)}")
    if answer is None or answer is ...:
        ok, why = False, "no answer yet: replace the placeholder with your answer and run the cell again."
        if verbose:
            print(f"Not yet [{id}]: {why}")
        return False
    try:
        ok, why = _REGISTRY[id].checker(answer)
    except (TypeError, ValueError) as err:  # a malformed answer is a wrong answer with a reason
        ok, why = False, f"could not read that answer ({err})"
    if verbose:
        print(f"{'Right' if ok else 'Not yet'} [{id}]: {why}")
    return ok


def number(answer: Any, expected: float, *, rel_tol: float = 1e-2, unit: str = "",
           mistakes: dict[float, str] | None = None, explain: str = "") -> tuple[bool, str]:
    """Helper for numeric exercises: accept within ``rel_tol``; name a known mistake if the answer hits one.
    numpy and torch scalars (``np.int64``, ``np.float32``, a 0-d tensor) count as the numbers they hold."""
    from ..validate import as_python_number
    answer = as_python_number(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise TypeError(f"expected a number, got {type(answer).__name__}")
    if math.isclose(answer, expected, rel_tol=rel_tol):
        return True, explain or f"{expected:,g}{unit}"
    for value, reason in (mistakes or {}).items():
        if math.isclose(answer, value, rel_tol=rel_tol):
            return False, reason
    direction = "high" if answer > expected else "low"
    return False, f"{answer:,g}{unit} is too {direction}. {explain}".strip()
