"""``dilated info``: installed packages, versions, backends and the device."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, distributions, version
from typing import Any

import torch

from dilated.core.cli.table import format_table
from dilated.core.registry import KNOWN_KINDS, available_implementations, get_implementation

#: The project's own distributions, listed even when not installed.
DISTRIBUTIONS = (
    "dilated-core",
    "dilated-kernels",
    "dilated-ring",
    "dilated-sparse",
    "dilated-longnet",
)


def installed_distributions() -> dict[str, str]:
    """Every installed ``dilated-*`` distribution by name, with its version."""
    found: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("dilated-"):
            found[name] = dist.version
    return found


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="packages, versions, implementations and the device")
    p.set_defaults(run=run)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def device_line() -> str:
    """The best device, as ``dilated bench`` would use it."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda:0 {props.name} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} GPU(s)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    found = installed_distributions()
    names = sorted(set(DISTRIBUTIONS) | set(found))
    print(format_table(["package", "version"], [(d, found.get(d, "not installed")) for d in names]))
    print()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}"
    )
    print(f"device: {device_line()}")
    print()
    rows = []
    for name, impl in available_implementations().items():
        backends = ", ".join(impl.backends()) if impl.backends is not None else "-"
        where = "distributed" if impl.distributed else "/".join(impl.devices)
        rows.append((name, impl.package, impl.priority, where, backends, impl.description))
    print(format_table(["kind", "package", "priority", "runs on", "backends", "description"], rows))
    missing = [
        f"{kind} ({pkg}{', installed but not providing it yet' if _version(pkg) != 'not installed' else ''})"
        for kind, pkg in KNOWN_KINDS.items()
        if kind not in available_implementations()
    ]
    if missing:
        print(f"\nknown kinds not registered here (their package): {', '.join(missing)}")
    auto = get_implementation("auto")
    print(f"\nkind='auto' picks {auto.name!r} ({auto.package}) here")
    return 0
