"""Where the shipped data lives, which device to use (GUIDE "Setup" step of every notebook), and how files
are written: atomically, so that a failed or interrupted save never leaves a half-written file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """cuda → mps → cpu, or the device named in ``prefer`` (refused when this machine lacks it)."""
    if prefer is not None:
        if not isinstance(prefer, (str, torch.device)):
            raise TypeError(f"device must be None, a string such as 'cpu' or 'cuda', or a torch.device, "
                            f"got {prefer!r} ({type(prefer).__name__})")
        try:
            device = torch.device(prefer)
        except RuntimeError as err:
            raise ValueError(f"device must name a torch device such as 'cpu', 'cuda', 'cuda:0' or 'mps', "
                             f"got {prefer!r}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={prefer!r} but this machine has no CUDA GPU visible to torch; use "
                             "device=None (picks what is there) or 'cpu'")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                         and torch.backends.mps.is_available()):
            raise ValueError(f"device={prefer!r} but MPS is not available here; use device=None or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path`` in
    one ``os.replace`` (atomic on POSIX and Windows), otherwise it is deleted and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), but atomic: readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
