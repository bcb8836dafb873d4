import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("PEFT_LAB_QUIET", "1")  # no progress bars in test logs


@pytest.fixture(scope="module")
def one_thread():
    """Small models run as fast on one thread, and stay fast when other processes load the CPUs."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """The shipped offline model and tokenizer, loaded once per test session."""
    from peft_lab import load_base_model
    return load_base_model("tiny", device="cpu")


@pytest.fixture()
def small_gpt2():
    """A 2-layer random GPT-2 with the tiny vocabulary: fast, for loop mechanics."""
    from transformers import GPT2Config

    from peft_lab import build_from_config
    cfg = GPT2Config(vocab_size=1024, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return build_from_config(cfg, device="cpu", seed=0)


def _cost_rank(item) -> int:
    """Longest first: a notebook under nbval (30–90 s, one process), a notebook on tiny-llama, a solutions
    notebook, the website build, then the unit tests (seconds each)."""
    path = str(item.path)
    if type(item).__module__.startswith("nbval"):
        return 2 if "solutions" in path else 0
    if path.endswith("test_notebooks_llama.py"):
        return 1
    return 3 if path.endswith("test_site.py") else 4


def pytest_collection_modifyitems(items):
    """The tests that launch CPU ranks (test_scale_out's ``runs`` fixture starts torchrun) are ``slow``. Then the
    long scopes go first: pytest-xdist hands scopes to its two processes in collection order, so a notebook
    collected last would run alone at the end while the other process idles; the many short unit tests,
    last, fill the gaps evenly (a stable sort keeps each scope's own order)."""
    for item in items:
        if "runs" in getattr(item, "fixturenames", ()) and item.module.__name__.endswith("test_scale_out"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_cost_rank)
