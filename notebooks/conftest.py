"""pytest over the notebooks (nbval): training runs without progress bars.

A bar streams output while a cell trains; nbval then compares that text with the committed output and, under
load, gives up after 5 s without a new message. The kernel inherits this process's environment, so setting
the variable here, at collection, quiets every notebook whether pytest is run on ``notebooks/`` alone or on
the whole repository.
"""
import os

os.environ["PEFT_LAB_QUIET"] = "1"  # read by peft_lab.train (and run_notebooks): no tqdm bar


def pytest_collection_modifyitems(items):
    """Every nbval item executes a notebook cell: marked ``slow`` (pyproject.toml's markers)."""
    import pytest
    for item in items:
        if type(item).__module__.startswith("nbval"):
            item.add_marker(pytest.mark.slow)
