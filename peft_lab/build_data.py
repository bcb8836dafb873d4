"""``python -m peft_lab.build_data [--out DIR]``: rewrite data/task/*.jsonl and data/heldout.jsonl from seeds."""
from __future__ import annotations

import argparse
from pathlib import Path

from .data import build_task_files


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=None, help="default: the repository's data/ folder")
    print(build_task_files(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
