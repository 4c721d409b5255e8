"""Argument types and shared options of the subcommands."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from dilated.core.checks import check_branches

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def int_list(text: str) -> list[int]:
    """Parse ``"256,512,1024"`` into positive ints (argparse type)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """Parse a positive int (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite float > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {value}")
    return value


def name_list(text: str) -> list[str]:
    """Parse ``"standard,improved"`` into names (argparse type)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def non_negative_int(text: str) -> int:
    """Parse an int >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU.

    Raises ``ValueError`` naming ``--device`` for a string that is not a device, a device type
    other than cpu/cuda, CUDA requested without CUDA, or a CUDA index beyond the GPUs present.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    return device


def plot_path(name: str | None) -> Path | None:
    """The file ``--plot`` will write, checked before any work is done.

    A name without a suffix gets ``.png`` (what matplotlib would append anyway); the suffix must
    be a format matplotlib writes, matplotlib must be installed, and the folder must exist and
    be writable. Raises ``ValueError`` naming ``--plot`` otherwise.
    """
    if name is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'dilated-core[plot]'") from None
    path = Path(name)
    if not path.suffix:
        path = path.with_suffix(".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(
            f"--plot {name!r}: matplotlib cannot write {path.suffix!r} files; use one of "
            + ", ".join(f".{f}" for f in sorted(formats))
        )
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"--plot {name!r} is a folder; name a file such as {path / 'bench.png'}")
    if not folder.is_dir():
        raise ValueError(f"--plot {name!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--plot {name!r}: {str(path)!r} is not writable")
    return path


def branches(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``--segment-lengths``/``--dilation-rates`` (ValueError names the rule)."""
    return check_branches(args.segment_lengths, args.dilation_rates)
