"""``python -m peft_lab.site --out DIR``: build the course website (see :mod:`peft_lab.site`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the course website from the executed notebooks")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the site into (replaced)")
    ap.add_argument("--executed", type=Path, default=None,
                    help="folder of freshly executed notebooks (e.g. build/notebooks): each replaces the committed "
                         "notebook of the same name; the others come from notebooks/")
    ap.add_argument("--verbose", action="store_true", help="print Sphinx's progress")
    args = ap.parse_args(argv)
    if args.executed is not None and not args.executed.is_dir():
        ap.error(f"no such folder: {args.executed}")
    info = build(args.out, args.executed, quiet=not args.verbose)
    for line in info["warnings"]:
        print(line, file=sys.stderr)
    print(f"wrote {len(info['pages'])} notebook pages and the landing page to {args.out} in {info['seconds']} s "
          f"({len(info['warnings'])} warnings); open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
