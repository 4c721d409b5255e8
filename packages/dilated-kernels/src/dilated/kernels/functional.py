"""The public op of dilated-kernels: validation by dilated-core, then a backend."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, overload

import torch

from dilated.core.functional import prepare_call
from dilated.core.packed import attend_packed
from dilated.kernels.backends import backend_forward

__all__ = ["dilated_attention"]


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
    backend: str = ...,
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
    backend: str = ...,
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
    backend: str = "auto",
    check_finite: bool | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention (as defined in the docs' Concepts page) on a chosen backend.

    Accepts and rejects exactly what [`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention] does.

    Args:
        q: queries ``(batch, seq, heads, head_dim)``, float16/bfloat16/float32/float64.
        k: keys ``(batch, seq, kv_heads, head_dim)``, ``heads % kv_heads == 0``.
        v: values, shaped like ``k``.
        segment_lengths: ``w_i`` of each branch.
        dilation_rates: ``r_i`` of each branch, ``w_i % r_i == 0``.
        scale: softmax scale, default ``head_dim ** -0.5``.
        is_causal: query ``t`` sees only keys ``u <= t``.
        key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
            ``-inf``) at the keys to ignore (padding); see
            [`check_key_padding_mask`][dilated.core.checks.check_key_padding_mask].
        dropout_p: dropout on the attention probabilities.
        return_lse: also return the merged log-sum-exp.
        backend: ``"auto"``, ``"cudnn"``, ``"triton"``, ``"flash"`` (flash-attn-4), ``"sdpa"`` or
            ``"reference"``; ``"auto"`` picks the fastest one that supports the call, and for the
            strided sub-problem backend the dense engine of each sub-problem (see
            [`choose_backend`][dilated.kernels.backends.choose_backend] and
            [`choose_engine`][dilated.kernels.engines.choose_engine]).
        check_finite: raise ``ValueError`` on NaN/Inf inputs (costs a device sync); None
            (default) reads the environment variable ``DILATED_CHECK_FINITE`` (off when unset),
            see [`resolve_check_finite`][dilated.core.checks.resolve_check_finite].
        cu_seqlens: a packed batch of sequences along ``seq`` of a batch of one, each attended
            alone with its segments counted from its own start (flash-attn's convention; see
            [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``; with ``return_lse`` also
        ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs), ``-inf`` for a query
        that sees no key (whose ``out`` is 0).

    Raises:
        ValueError: invalid inputs, an unknown backend, or a backend that cannot run the call.
    """
    # Inputs first: the backend choice reads them (``q.is_cuda``), so a bad one would otherwise
    # fail there with an AttributeError instead of a message naming it.
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
    forward, packs = backend_forward(backend, q, k, key_mask, dropout_p)
    out, lse = attend_packed(
        functools.partial(forward, segment_lengths=ws, dilation_rates=rs),
        q,
        k,
        v,
        cu_seqlens,
        native=packs,
        scale=softmax_scale,
        is_causal=is_causal,
        key_padding_mask=key_mask,
        dropout_p=dropout_p,
    )
    return (out, lse) if return_lse else out
