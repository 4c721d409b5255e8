"""The public dilated-attention op of dilated-core: validation, then the reference implementation."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, overload

import torch

from dilated.core.checks import (
    check_attention_inputs,
    check_bool,
    check_branches,
    check_dropout,
    check_finite,
    check_key_padding_mask,
    check_scale,
    resolve_check_finite,
)
from dilated.core.packed import attend_packed
from dilated.core.reference import dilated_attention_reference

__all__ = ["dilated_attention", "prepare_call"]


def prepare_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    check_finite_inputs: bool | None,
    is_causal: bool = False,
    return_lse: bool = False,
    decoding: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], float, torch.Tensor | None]:
    """Run every check of one dilated-attention call; return the branches, scale and key mask.

    Shared by every backend's public op, and by the one-query decoding step of dilated-longnet,
    so that they accept and reject exactly the same inputs. ``check_finite_inputs`` is resolved
    by [`resolve_check_finite`][dilated.core.checks.resolve_check_finite] (None: the
    environment). ``decoding``: ``q`` is one query row ``(batch, 1, heads, head_dim)`` over all
    of ``k``'s positions, and ``key_padding_mask`` covers ``k``'s ``(batch, seq)`` (see
    [`check_attention_inputs`][dilated.core.checks.check_attention_inputs]).

    Returns:
        ``(segment_lengths, dilation_rates, scale, key_mask)``: ``key_mask`` is the public
        ``key_padding_mask`` (PyTorch's convention: True or ``-inf`` = ignored) converted once,
        by [`check_key_padding_mask`][dilated.core.checks.check_key_padding_mask], into the
        internal form every implementation takes: bool ``(batch, seq)``, True = a key that may
        be attended; or None.
    """
    check_attention_inputs(q, k, v, decoding=decoding)
    ws, rs = check_branches(segment_lengths, dilation_rates)
    # The keys' (batch, seq): q's too, except in a decoding step.
    key_mask = check_key_padding_mask(key_padding_mask, k)
    check_dropout("dropout_p", dropout_p)
    check_bool("is_causal", is_causal)
    check_bool("return_lse", return_lse)
    if resolve_check_finite(check_finite_inputs):
        check_finite(q=q, k=k, v=v)
    return ws, rs, check_scale(scale, q.shape[-1]), key_mask


@overload
def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = ...,
    is_causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    dropout_p: float = ...,
    return_lse: Literal[False] = ...,
    check_finite: bool | None = ...,
    cu_seqlens: torch.Tensor | Sequence[int] | None = ...,
) -> torch.Tensor: ...


@overload
def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = ...,
    is_causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    dropout_p: float = ...,
    return_lse: Literal[True],
    check_finite: bool | None = ...,
    cu_seqlens: torch.Tensor | Sequence[int] | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    check_finite: bool | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention, exactly as defined in the docs' Concepts page (the reference implementation).

    Args:
        q: queries ``(batch, seq, heads, head_dim)``, float16/bfloat16/float32/float64.
        k: keys ``(batch, seq, kv_heads, head_dim)``; ``heads`` must be a multiple of ``kv_heads``
            (grouped-query attention: query head ``j`` reads kv head ``j // (heads // kv_heads)``).
        v: values, shaped like ``k``.
        segment_lengths: ``w_i`` of each branch; the last segment may be shorter when ``seq`` is
            not a multiple of ``w_i``.
        dilation_rates: ``r_i`` of each branch, with ``w_i % r_i == 0``. Head ``j`` reads the
            positions ``t`` with ``t mod r_i == j mod r_i``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        is_causal: query ``t`` sees only keys ``u <= t``.
        key_padding_mask: ``(batch, seq)``, PyTorch's convention (``nn.MultiheadAttention``):
            bool with True at the keys to ignore (padding), or float with ``-inf`` at the keys
            to ignore and ``0`` elsewhere; ignored keys are never seen. A row whose keys are
            all ignored gives ``out = 0`` and ``lse = -inf`` (finite, zero gradients).
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation).
        return_lse: also return the merged log-sum-exp.
        check_finite: raise ``ValueError`` when q, k or v holds NaN or Inf (one pass over the
            inputs and a device sync). None (default) reads the environment variable
            ``DILATED_CHECK_FINITE`` (off unless ``1``/``true``/``yes``/``on``); when off,
            non-finite inputs propagate as in dense attention.
        cu_seqlens: a packed batch (flash-attn's convention): ``q``, ``k``, ``v`` are
            ``(1, total, ·, head_dim)`` and sequence ``i`` is rows
            ``cu_seqlens[i]:cu_seqlens[i + 1]``, attended alone, its segments counted from its
            own first row (see [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``; with ``return_lse``, also
        ``lse`` ``(batch, heads, seq)`` in float32 (float64 for float64 inputs). A query that no
        branch lets see any key gets ``out = 0`` and ``lse = -inf``.

    Half-precision inputs are computed in float32 and the output rounded once at the end.
    """
    ws, rs, softmax_scale, key_mask = prepare_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        check_finite_inputs=check_finite,
        is_causal=is_causal,
        return_lse=return_lse,
    )
    out, lse = attend_packed(
        functools.partial(dilated_attention_reference, segment_lengths=ws, dilation_rates=rs),
        q,
        k,
        v,
        cu_seqlens,
        scale=softmax_scale,
        is_causal=is_causal,
        key_padding_mask=key_mask,
        dropout_p=dropout_p,
    )
    return (out, lse) if return_lse else out
