"""Every validation rule of dilated attention, in one place.

Each check raises `ValueError` (or `TypeError` for a wrong kind of object) whose
message names the argument, the offending value and the rule it breaks. Implementations in every
``dilated`` package call these functions instead of writing their own checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_attention_inputs",
    "check_branches",
    "check_dropout",
    "check_finite",
    "check_key_padding_mask",
    "check_positive_int",
    "check_scale",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def check_branches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate one branch list and return it as two tuples of ints.

    Rules: both are non-empty sequences of positive integers of equal length, and every segment
    length is a multiple of its dilation rate (``w_i % r_i == 0``).
    """
    for name, seq in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{name} must be a sequence of positive integers, got {seq!r}")
        if len(seq) == 0:
            raise ValueError(
                f"{name} must not be empty: dilated attention needs at least one branch"
            )
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length (one dilation rate per "
            f"segment length), got {len(segment_lengths)} and {len(dilation_rates)}"
        )
    ws = tuple(
        check_positive_int(f"segment_lengths[{i}]", w) for i, w in enumerate(segment_lengths)
    )
    rs = tuple(check_positive_int(f"dilation_rates[{i}]", r) for i, r in enumerate(dilation_rates))
    for i, (w, r) in enumerate(zip(ws, rs)):
        if w % r != 0:
            raise ValueError(
                f"segment_lengths[{i}]={w} must be a multiple of dilation_rates[{i}]={r} "
                "(w % r == 0)"
            )
    return ws, rs


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` if given (finite and positive), else ``head_dim**-0.5``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None, got {scale}")
    return float(scale)


def check_dropout(name: str, p: float) -> float:
    """Return ``p`` if it is a probability in ``[0, 1)``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check the ``(batch, seq, heads, head_dim)`` inputs of one dilated-attention call.

    Rules: tensors of rank 4; equal batch, seq and head_dim; ``k`` and ``v`` of one shape; query
    heads a multiple of key/value heads (grouped-query attention); one floating dtype and one device.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4, (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, n, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
        raise ValueError(
            "q and k must agree in batch, seq and head_dim (dims 0, 1, 3), got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if n == 0 or b == 0 or d == 0 or hq == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k and v must not have an empty dimension, got q {tuple(q.shape)}")
    hkv = k.shape[2]
    if hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query "
            "attention"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )


def check_key_padding_mask(mask: torch.Tensor | None, q: torch.Tensor) -> None:
    """Check a ``(batch, seq)`` boolean ``key_padding_mask`` (True = real token) against ``q``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be a bool tensor (True = real token), got {mask.dtype}"
        )
    if tuple(mask.shape) != (q.shape[0], q.shape[1]):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seq) = {(q.shape[0], q.shape[1])}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on {q.device}, got {mask.device}")


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or Inf.

    This reads every element and synchronises with the device; it is skipped while
    ``torch.compile`` traces, where data-dependent errors cannot be raised.
    """
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} holds NaN or Inf values; dilated attention needs finite inputs "
                "(pass check_finite=False to let non-finite values propagate as in dense attention)"
            )
