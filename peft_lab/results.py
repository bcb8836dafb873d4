"""A machine-readable record of what the notebooks measured (for ``build/results.json``).

``record("accuracy_full_ft", 0.93)`` returns the value unchanged; when the notebook runner sets
``PEFT_LAB_RESULTS`` to a JSON file, the value is also merged into that file. In a normal session it only
returns the value, so notebooks stay runnable on their own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import validate
from .paths import atomic_path, write_text_atomic

ENV_VAR = "PEFT_LAB_RESULTS"
FIGURES_VAR = "PEFT_LAB_FIGURES"  # a folder: save_figure writes <name>.png there (the main command sets it)


def _plain(value):
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record(key: str, value):
    """Return ``value``; with ``PEFT_LAB_RESULTS`` set, also store it under ``key`` in that JSON file.

    ``value`` must be JSON-serialisable once numpy/torch scalars are made plain (checked in every session,
    so a notebook fails the same way with and without the runner). The file is replaced atomically.
    """
    from .validate import require_str
    require_str("key", key)
    try:
        text = json.dumps(_plain(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"value for record({key!r}, ...) must be a number, string, bool, None or a list/dict of "
                        f"those (JSON), got {type(value).__name__}: {err}") from None
    target = os.environ.get(ENV_VAR)
    if target:
        path = Path(target)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = json.loads(text)
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return value


def save_figure(fig, name: str):
    """Save ``fig`` as ``<name>.png`` (150 dpi, tight) in ``$PEFT_LAB_FIGURES`` when the notebook runner sets
    it — slide-ready copies of a notebook's plots under ``build/figures/``; otherwise do nothing. Returns
    the path written, or ``None``."""
    if "/" in validate.require_str("name", name) or "\\" in name:
        raise ValueError(f"name must be a plain file name without folders, got {name!r}")
    folder = os.environ.get(FIGURES_VAR)
    if not folder:
        return None
    path = Path(folder) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    return path
