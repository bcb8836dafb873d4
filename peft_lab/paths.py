"""Where the shipped data lives, and which device to use (GUIDE "Setup" step of every notebook)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ENV_VAR = "PEFT_LAB_DATA"


def data_dir() -> Path:
    """The ``data/`` folder: ``$PEFT_LAB_DATA`` if set, else the repository's ``data/`` beside the package.

    In Colab the setup cell clones the repository, so the second rule finds it; a plain ``pip install``
    without a clone needs ``PEFT_LAB_DATA`` (the error says so).
    """
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={path} is not a folder")
        return path
    path = Path(__file__).resolve().parent.parent / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            "peft_lab's data/ folder was not found next to the package. Clone the repository and install it "
            f"with `pip install -e .`, or set {ENV_VAR} to the clone's data/ folder."
        )
    return path


def pick_device(prefer: str | None = None) -> torch.device:
    """cuda → mps → cpu, or the device named in ``prefer``."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
