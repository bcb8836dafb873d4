"""Where the shipped data lives, which device to use (the "Setup" cell of every notebook), and how files
and folders are written: atomically, so that a failed or interrupted save never leaves a half-written file
or a folder whose files do not belong together."""
from __future__ import annotations

import os
import shutil
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
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """The one way the package writes to disk: yield a temporary file (``folder=True``: a temporary folder)
    beside ``path``; when the block ends without error it takes the place of ``path``, otherwise it is
    deleted and ``path`` is untouched. Permissions are the usual ones, from the process umask (0644 and 0755
    under the common umask 022), not the 0600/0700 of ``tempfile``.

    A file replaces ``path`` in one ``os.replace`` (atomic on POSIX and Windows). A folder replaces an
    existing one by two renames (the old folder is moved aside, the new one into place) and then gets back
    whatever else the old one held; readers therefore see the old set of files or the new one, never a mix.
    Folders this call had to create are removed again on failure. An ``OSError`` names ``path``, not the
    temporary name.
    """
    path = Path(path)
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    tmp = None
    try:
        blocking = next((d for d in (path.parent, *path.parent.parents) if d.exists() and not d.is_dir()), None)
        if blocking is not None:
            raise NotADirectoryError(f"cannot write {str(path)!r}: {str(blocking)!r} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        yield tmp
        _put_in_place(tmp, path, folder)
    except BaseException as err:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink()
        for made in created:  # innermost first
            try:
                made.rmdir()
            except OSError:
                break
        if isinstance(err, OSError) and str(path) not in str(err):
            message = f"cannot write {str(path)!r}: {err.strerror or err}"
            raise (type(err)(err.errno, message) if err.errno is not None else type(err)(message)) from err
        raise


def _put_in_place(tmp: Path, path: Path, folder: bool) -> None:
    # the writer may have made its files private (safetensors writes 0600): give every one the usual mode
    for entry in [tmp, *(tmp.rglob("*") if folder else ())]:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~_umask())
    if not folder or not path.exists():
        os.replace(tmp, path)
        return
    if not path.is_dir():
        raise FileExistsError(f"{str(path)!r} is an existing file, not a folder")
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.replace(path, aside / path.name)
    os.replace(tmp, path)
    for entry in (aside / path.name).iterdir():  # what else the old folder held
        if not (path / entry.name).exists():
            os.replace(entry, path / entry.name)
    shutil.rmtree(aside)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), but atomic: readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
