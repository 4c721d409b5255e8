"""The ``dilated`` command: ``info``, ``check`` and ``bench``.

Each subcommand lives in its own module and registers its arguments through ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dilated.core.cli import bench, check, info

__all__ = ["main"]


def _version() -> str:
    """``dilated-core X.Y.Z``, then every other installed ``dilated-*`` package and its version."""
    found = info.installed_distributions()
    core = found.pop("dilated-core", "unknown")
    others = ", ".join(f"{name} {v}" for name, v in sorted(found.items()))
    return f"dilated-core {core}" + (f" ({others})" if others else "")


class _VersionAction(argparse.Action):
    # argparse's own "version" action re-wraps the text to the terminal width.
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dilated`` with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dilated", description="LongNet dilated attention: inspect, check and benchmark."
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the installed dilated-* package versions"
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
