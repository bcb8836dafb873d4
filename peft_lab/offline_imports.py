"""Keep third-party imports offline and quiet: bitsandbytes' CPU backend must not reach for the hub.

bitsandbytes (0.50.x), when its CPU backend is imported on a CPU with AVX512-BF16, asks the ``kernels``
package for a compiled 4-bit matmul from the Hugging Face Hub (``kernels-community/quantization-bitsandbytes``)
and, when that fails — always, offline — logs "Failed to load CPU gemm_4bit_forward …" to stderr, then uses
its own built-in CPU kernel. ``import peft`` imports bitsandbytes when it is installed, so on such a CPU every
notebook cell that first imports peft printed that line, and every import tried the network.

:func:`install` (run by ``import peft_lab``) registers an import hook for that one module: while it is being
imported, ``kernels.get_kernel`` refuses at once (recorded in :data:`REFUSED`) and bitsandbytes' message about
the refusal is dropped, so bitsandbytes takes its built-in kernel — what it does offline anyway — without
the network and without a word. Nothing else changes; once the module is imported the hook is inert. It
works only when ``peft_lab`` is imported before ``peft`` or ``bitsandbytes`` (every notebook that imports
``peft`` imports ``peft_lab`` first; tests/test_offline_imports.py checks it).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys

__all__ = ["install", "REFUSED", "TARGET"]

TARGET = "bitsandbytes.backends.cpu.ops"   # the module whose import fetches the kernel
REFUSED: list[str] = []                    # the hub kernels refused while importing it (for the tests)
_MESSAGE = "Failed to load CPU gemm_4bit_forward"   # the start of bitsandbytes' warning about the refusal


class _DropRefusalMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MESSAGE)


@contextlib.contextmanager
def _hub_kernels_refused():
    """``kernels.get_kernel`` raises at once (if ``kernels`` is installed) and bitsandbytes' report of it is
    dropped; both restored afterwards."""
    log, drop = logging.getLogger(TARGET), _DropRefusalMessage()
    log.addFilter(drop)
    try:
        import kernels
    except ImportError:   # bitsandbytes then fails its own import of kernels, and the filter drops its message
        kernels = None
    original = getattr(kernels, "get_kernel", None)

    def refuse(repo_id, *args, **kwargs):
        REFUSED.append(repo_id)
        raise RuntimeError(f"peft_lab: hub kernel {repo_id!r} not fetched while importing {TARGET}")

    if kernels is not None:
        kernels.get_kernel = refuse
    try:
        yield
    finally:
        if kernels is not None:
            kernels.get_kernel = original
        log.removeFilter(drop)


class _Loader(importlib.abc.Loader):
    """The module's own loader, its ``exec_module`` run inside :func:`_hub_kernels_refused`."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        with _hub_kernels_refused():
            self.inner.exec_module(module)

    def __getattr__(self, name):   # get_source, get_code, ... for tracebacks and tools
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register the hook once, first on ``sys.meta_path``; a no-op when the module is already imported."""
    if TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
