"""Packed batches: several sequences along ``seq`` of a batch of one, each attended alone.

The convention of flash-attn's varlen functions (``cu_seqlens``): sequence ``i`` holds rows
``cu_seqlens[i]:cu_seqlens[i + 1]``, its segments are counted from its own first row, and no
query sees a key of another sequence. Every functional op and module of the project takes
``cu_seqlens=`` and computes each sequence exactly as a call on that sequence alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from dilated.core.checks import check_cu_seqlens

__all__ = ["attend_packed", "packed_attention", "packed_calls", "sequence_slices"]

_Result = TypeVar("_Result")


def sequence_slices(bounds: Sequence[int]) -> list[slice]:
    """The rows of each non-empty sequence of a packed batch (``bounds``: a checked
    ``cu_seqlens``)."""
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def packed_calls(
    attention: Callable[..., _Result],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    *,
    key_padding_mask: torch.Tensor | None,
    **options: Any,
) -> list[_Result]:
    """``attention`` on each non-empty packed sequence of ``q``, ``k``, ``v`` ``(1, total,
    heads, head_dim)`` (views, no copy), in order; with no row at all, the one call over the
    whole (empty) inputs, which gives the shapes.

    Args:
        attention: ``(q, k, v, *, key_padding_mask, **options)`` of one call; any result.
        q, k, v: the packed inputs.
        bounds: the validated ``cu_seqlens`` (see
            [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).
        key_padding_mask: ``(1, total)``, in the form ``attention`` takes, or None.
        options: passed to every call.
    """
    pieces = sequence_slices(bounds)
    if not pieces:
        return [attention(q, k, v, key_padding_mask=key_padding_mask, **options)]
    return [
        attention(
            q[:, rows], k[:, rows], v[:, rows], **options,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, rows],
        )
        for rows in pieces
    ]  # fmt: skip


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
    """[`packed_calls`][dilated.core.packed.packed_calls] of an op returning ``(out, lse)``,
    concatenated along ``seq``: ``out`` ``(1, total, heads, head_dim)``, ``lse``
    ``(1, heads, total)``. ``key_padding_mask`` is the internal form (True = a key that may be
    attended) that [`prepare_call`][dilated.core.functional.prepare_call] returns."""
    results = packed_calls(attention, q, k, v, bounds, key_padding_mask=key_padding_mask, **options)
    return torch.cat([o for o, _ in results], dim=1), torch.cat([m for _, m in results], dim=2)


def attend_packed(
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
    *,
    key_padding_mask: torch.Tensor | None,
    native: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` on the whole call, or on each sequence of a packed batch when
    ``cu_seqlens`` is given (checked by [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).
    What every functional op runs after its checks.

    ``native``: ``attention`` takes the packed batch itself, as ``sequence_bounds=`` (the checked
    boundaries), in one call; otherwise it is called once per sequence.
    """
    if cu_seqlens is None:
        return attention(q, k, v, key_padding_mask=key_padding_mask, **options)
    bounds = check_cu_seqlens(cu_seqlens, q)
    if native:
        return attention(
            q, k, v, key_padding_mask=key_padding_mask, sequence_bounds=bounds, **options
        )
    return packed_attention(
        attention, q, k, v, bounds, key_padding_mask=key_padding_mask, **options
    )
