"""Argument types and shared options of the subcommands."""

from __future__ import annotations

import argparse

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
    """The requested device, or CUDA when available, else CPU; errors when CUDA is missing."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    return device


def branches(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``--segment-lengths``/``--dilation-rates`` (ValueError names the rule)."""
    return check_branches(args.segment_lengths, args.dilation_rates)
