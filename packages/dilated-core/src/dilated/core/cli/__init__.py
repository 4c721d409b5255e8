"""The ``dilated`` command: ``info``, ``check`` and ``bench``.

Each subcommand lives in its own module and registers its arguments through ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dilated.core.cli import bench, check, info

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dilated`` with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dilated", description="LongNet dilated attention: inspect, check and benchmark."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (info, check, bench):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dilated`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        code: int = args.run(args)
    except ValueError as exc:  # bad option values found after parsing
        parser.exit(2, f"dilated {args.command}: error: {exc}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
