"""Grading helpers for numeric exercises that give a hint, not the worked answer, after a wrong try.

:func:`peft_lab.exercises.number` appends its ``explain`` text (often the worked answer) to "too high/low"; a
single guess near the answer would then reveal it. :func:`hinted` keeps the worked explanation for a right
answer and gives ``hint`` after a wrong one, so the student can try again (the worked answer is in the
solutions notebook).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

from . import as_number, number


def hinted(answer: Any, expected: float, *, hint: str, explain: str, rel_tol: float = 1e-2, unit: str = "",
           mistakes: dict[float, str] | None = None) -> tuple[bool, str]:
    """Like :func:`number`, but a wrong answer that matches no known mistake gets ``hint``, not ``explain``."""
    ok, why = number(answer, expected, rel_tol=rel_tol, unit=unit, mistakes=mistakes, explain=hint)
    return (True, explain) if ok else (False, why)


def unit_slips(expected: float, unit: str) -> dict[float, str]:
    """The usual unit slips around ``expected`` given in ``unit`` ("GiB" or "MiB"): decimal units and the
    neighbouring binary unit, each with the message that names it."""
    binary = {"GiB": 2**30, "MiB": 2**20}[unit]
    decimal, dec_name = (10**9, "GB") if unit == "GiB" else (10**6, "MB")
    other = {"GiB": ("MiB", 1024.0), "MiB": ("GiB", 1 / 1024)}[unit]
    return {expected * binary / decimal: f"that is in {dec_name} (10**{int(math.log10(decimal))} bytes); the "
                                         f"question asks for {unit} (2**{int(math.log2(binary))} bytes).",
            expected * other[1]: f"that is in {other[0]}; the question asks for {unit}.",
            expected * binary: f"that is in bytes; divide by 2**{int(math.log2(binary))} for {unit}."}


def numbers_in(answer: Any) -> list[float] | None:
    """A list/tuple of numbers as floats (a breakdown such as (4, 4, 8)), else ``None``."""
    if isinstance(answer, (list, tuple)) and answer and all(
            isinstance(as_number(a), Real) and not isinstance(as_number(a), bool) for a in answer):
        return [float(as_number(a)) for a in answer]
    return None
