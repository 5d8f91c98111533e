"""``subnets-report <folder> [--out DIR] [--alpha A]`` and ``python -m subnets.report``: a study's
tables, significance tests and figures (``subnets.report.write_report``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from subnets.report import write_report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m subnets.report <folder> [--out DIR] [--alpha A]``."""
    parser = argparse.ArgumentParser(
        prog="subnets-report", description="A study's tables, tests and figures."
    )
    parser.add_argument("folder", help="a multirun folder (e.g. multirun/ud_fewshot) or one run folder")
    parser.add_argument("--out", help="output folder (default: <folder>/report)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.folder, args.out, args.alpha)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(path.read_text(encoding="utf-8"))
    print(f"report written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
