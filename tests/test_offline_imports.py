"""Importing peft_lab, then peft, transformers and bitsandbytes stays offline and silent on any CPU.

bitsandbytes' CPU backend branches on the CPU: with AVX512-BF16 it asks the hub for a kernel at import and
logs a warning when it cannot have one (:mod:`peft_lab.offline_imports`). These tests take that branch on any
machine by making bitsandbytes' native feature check answer yes, in a fresh interpreter, with every name
lookup and socket connection refused and recorded. The control (peft first, no peft_lab) shows the branch is
really taken: there the warning appears and, where the kernels package is installed, the network is tried.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

SCRIPT = textwrap.dedent('''
    import importlib.abc, importlib.machinery, json, socket, sys

    CONNECTS = []
    def refuse(self, address, *args):
        CONNECTS.append(str(address))
        raise OSError("this test allows no network")
    socket.socket.connect = refuse
    def no_lookup(host, *args, **kwargs):
        CONNECTS.append(str(host))
        raise socket.gaierror("this test allows no network")
    socket.getaddrinfo = no_lookup

    class ForceAVX512BF16(importlib.abc.MetaPathFinder):
        """bitsandbytes' native check of the CPU answers yes, whatever this CPU has."""
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.cextension":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            inner = spec.loader
            class Loader(importlib.abc.Loader):
                def create_module(self, s):
                    return inner.create_module(s)
                def exec_module(self, module):
                    inner.exec_module(module)
                    module.lib.has_avx512bf16_cpu = lambda: True
            spec.loader = Loader()
            return spec
    sys.meta_path.insert(0, ForceAVX512BF16())

    FIRST = sys.argv[1] == "peft_lab"
    if FIRST:
        import peft_lab
    import peft, transformers, bitsandbytes
    from bitsandbytes.functional import has_avx512bf16
    out = {"branch": bool(has_avx512bf16()), "connects": CONNECTS}
    if FIRST:
        import torch
        from peft_lab.reference_bitsandbytes import linear4bit
        out["refused"] = peft_lab.offline_imports.REFUSED
        out["reference_bf16_path"] = linear4bit(torch.nn.Linear(64, 64)).support_avx512bf16_for_cpu
    print(json.dumps(out))
''')


def _run(first: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", SCRIPT, first], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_avx512bf16_branch_is_silent_and_offline_after_peft_lab():
    out, stderr = _run("peft_lab")
    assert out["branch"], "the patched feature check did not take bitsandbytes' AVX512-BF16 branch"
    # with the kernels package (transformers 5 brings it) the fetch is refused; without it bitsandbytes' own
    # import of kernels fails first (the floor environment) — either way its message must not reach stderr
    fetched = ["kernels-community/quantization-bitsandbytes"] if importlib.util.find_spec("kernels") else []
    assert out["refused"] == fetched, out
    assert out["connects"] == [], f"an import tried the network: {out['connects']}"
    assert stderr == "", f"imports printed to stderr:\n{stderr}"
    # the reference layer computes as on a CPU without the feature: dequantize, then multiply in fp32
    assert out["reference_bf16_path"] is False


def test_control_without_peft_lab_shows_the_branch():
    """Without the hook the same imports print bitsandbytes' warning: the test above can fail."""
    out, stderr = _run("peft")
    assert out["branch"]
    assert "Failed to load CPU gemm_4bit_forward" in stderr
    if importlib.util.find_spec("kernels"):   # with the kernels package the fetch really goes for the network
        assert out["connects"], out


def test_every_notebook_imports_peft_lab_before_peft():
    """The hook works only when peft_lab is imported first; a notebook that imports peft (or bitsandbytes)
    earlier would print the warning again on an AVX512-BF16 CPU."""
    import re

    import nbformat

    from peft_lab.run_notebooks import all_notebooks
    late = []
    for path in all_notebooks():
        lines = [line for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
                 for line in cell.source.splitlines()]
        third = r"\s*(from (peft|bitsandbytes)\b(?!_)|import .*\b(peft|bitsandbytes)\b(?!_))"
        first = {name: next((i for i, line in enumerate(lines) if re.match(pattern, line)), None)
                 for name, pattern in [("peft_lab", r"\s*(import|from) peft_lab\b"), ("third", third)]}
        if first["third"] is not None and (first["peft_lab"] is None or first["peft_lab"] > first["third"]):
            late.append(path.name)
    assert not late, f"import peft_lab before peft in: {late}"
