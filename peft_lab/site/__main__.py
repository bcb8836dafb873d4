"""``python -m peft_lab.site --out DIR``: build the course website (see :mod:`peft_lab.site`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import NOTEBOOKS, build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the course website from the executed notebooks")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the site into (replaced)")
    ap.add_argument("--notebooks", type=Path, default=NOTEBOOKS,
                    help="folder of executed notebooks (default: the committed ones in notebooks/)")
    ap.add_argument("--verbose", action="store_true", help="print Sphinx's progress")
    args = ap.parse_args(argv)
    if not args.notebooks.is_dir():
        ap.error(f"no such folder: {args.notebooks}")
    info = build(args.out, args.notebooks, quiet=not args.verbose)
    for line in info["warnings"]:
        print(line, file=sys.stderr)
    print(f"wrote {len(info['pages'])} notebook pages and the landing page to {args.out} in {info['seconds']} s "
          f"({len(info['warnings'])} warnings); open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
