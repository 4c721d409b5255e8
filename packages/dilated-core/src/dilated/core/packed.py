"""Packed batches: several sequences along ``seq`` of a batch of one, each attended alone.

The convention of flash-attn's varlen functions (``cu_seqlens``): sequence ``i`` holds rows
``cu_seqlens[i]:cu_seqlens[i + 1]``, its segments are counted from its own first row, and no
query sees a key of another sequence. Every functional op and module of the project takes
``cu_seqlens=`` and computes each sequence exactly as a call on that sequence alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dilated.core.checks import check_cu_seqlens

__all__ = ["attend_packed", "packed_attention", "sequence_slices"]


def sequence_slices(bounds: Sequence[int]) -> list[slice]:
    """The rows of each non-empty sequence of a packed batch (``bounds``: a checked
    ``cu_seqlens``)."""
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def packed_attention(
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    *,
    key_padding_mask: torch.Tensor | None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` on each packed sequence of ``q``, ``k``, ``v`` ``(1, total, heads,
    head_dim)`` (views, no copy), the results concatenated along ``seq``.

    Args:
        attention: ``(q, k, v, *, key_padding_mask, **options) -> (out, lse)`` of one call.
        q, k, v: the packed inputs.
        bounds: the validated ``cu_seqlens`` (see
            [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).
        key_padding_mask: bool ``(1, total)`` in the internal form (True = a key that may be
            attended) that [`prepare_call`][dilated.core.functional.prepare_call] returns, or None.
        options: passed to every call.

    Returns:
        ``(out, lse)``: ``out`` ``(1, total, heads, head_dim)``, ``lse`` ``(1, heads, total)``.
    """
    outs, lses = [], []
    for rows in sequence_slices(bounds):
        mask = None if key_padding_mask is None else key_padding_mask[:, rows]
        out, lse = attention(q[:, rows], k[:, rows], v[:, rows], key_padding_mask=mask, **options)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no row at all: the one call over the empty batch gives the shapes
        return attention(q, k, v, key_padding_mask=key_padding_mask, **options)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def attend_packed(
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
    *,
    key_padding_mask: torch.Tensor | None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` on the whole call, or on each sequence of a packed batch when
    ``cu_seqlens`` is given (checked by [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).
    What every functional op runs after its checks."""
    if cu_seqlens is None:
        return attention(q, k, v, key_padding_mask=key_padding_mask, **options)
    bounds = check_cu_seqlens(cu_seqlens, q)
    return packed_attention(
        attention, q, k, v, bounds, key_padding_mask=key_padding_mask, **options
    )
