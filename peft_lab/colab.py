"""The one place the repository URL lives, and the Colab header every notebook starts with.

Every notebook's badge and Colab setup cell are made from :data:`REPO_URL`; a test checks they still agree.
After forking, point the notebooks at the fork with ``python -m peft_lab.colab --repo URL``.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .paths import write_text_atomic

REPO_URL = "https://github.com/peft-lab/peft-lab"
BRANCH = "main"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def badge(notebook: str, repo_url: str = REPO_URL) -> str:
    """Markdown for the "Open in Colab" badge of ``notebooks/<notebook>``."""
    path = repo_url.removeprefix("https://github.com/")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{notebook})")


def setup_cell(repo_url: str = REPO_URL) -> str:
    """Source of the Colab-only setup cell: clone, install, point the package at the clone's data/."""
    return f'''# Colab only: fetch the course (package, tiny model, task data). Elsewhere this cell does nothing.
import sys
if "google.colab" in sys.modules:
    REPO_URL = "{repo_url}"
    !git clone --quiet --depth 1 {{REPO_URL}} /content/peft-lab
    %pip install --quiet /content/peft-lab
    %env PEFT_LAB_DATA=/content/peft-lab/data'''


URL_RE = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?(?=[/\"'\s)]|$)")
BADGE_RE = re.compile(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/")


def repo_urls(nb_path: Path) -> set[str]:
    """Every repository URL a notebook mentions (badge and setup cell)."""
    text = nb_path.read_text(encoding="utf-8")
    return set(URL_RE.findall(text)) | {f"https://github.com/{m}" for m in BADGE_RE.findall(text)}


def retarget(repo_url: str, folder: Path = NOTEBOOKS) -> list[Path]:
    """Rewrite the badge and setup cell of every notebook under ``folder`` to ``repo_url``."""
    changed = []
    for nb_path in sorted(folder.rglob("*.ipynb")):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        text = json.dumps(nb)
        for old in repo_urls(nb_path):
            text = text.replace(old, repo_url).replace(old.removeprefix("https://github.com/"),
                                                       repo_url.removeprefix("https://github.com/"))
        if text != json.dumps(nb):
            write_text_atomic(nb_path, json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n")
            changed.append(nb_path)
    return changed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Point every notebook's Colab badge and setup cell at a fork")
    ap.add_argument("--repo", required=True, help="e.g. https://github.com/you/peft-lab")
    for p in retarget(ap.parse_args(argv).repo):
        print("updated", p.name)


if __name__ == "__main__":
    main()
