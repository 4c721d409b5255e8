"""The public op of dilated-sparse: validation, the block layouts, and a custom autograd function."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch

from dilated.core.config import SparsePatternConfig
from dilated.core.functional import prepare_call
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.core.sparsity import BranchLayout, resolve_layouts
from dilated.sparse.engine import block_sparse_backward, block_sparse_forward

__all__ = ["block_sparse_dilated_attention", "branch_layouts"]

_LAYOUTS: OrderedDict[
    tuple[int, tuple[int, ...], tuple[int, ...]],
    tuple[SparsePatternConfig, tuple[BranchLayout, ...]],
] = OrderedDict()


def branch_layouts(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[BranchLayout, ...]:
    """[`resolve_layouts`][dilated.core.sparsity.resolve_layouts], cached per config object and
    branches (a config is frozen, so its layouts never change)."""
    key = (id(config), tuple(segment_lengths), tuple(dilation_rates))
    hit = _LAYOUTS.get(key)
    # The config is kept in the entry so that its id cannot be reused while cached.
    if hit is None or hit[0] is not config:
        hit = (config, resolve_layouts(config, segment_lengths, dilation_rates))
        _LAYOUTS[key] = hit
        if len(_LAYOUTS) > 64:
            _LAYOUTS.popitem(last=False)
    return hit[1]


class _BlockSparseDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layouts: tuple[BranchLayout, ...],
        block_size: int,
        scale: float,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        dropout_seed: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = block_sparse_forward(
            q,
            k,
            v,
            layouts,
            block_size,
            scale=scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
        )
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (layouts, block_size, scale, is_causal, dropout_p, dropout_seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        layouts, block_size, scale, is_causal, dropout_p, dropout_seed = ctx.options
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = block_sparse_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            layouts,
            block_size,
            scale=scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 7)


@overload
def block_sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    sparse_config: SparsePatternConfig,
    scale: float | None = ...,
    is_causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    dropout_p: float = ...,
    return_lse: Literal[False] = ...,
    check_finite: bool = ...,
) -> torch.Tensor: ...


@overload
def block_sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    sparse_config: SparsePatternConfig,
    scale: float | None = ...,
    is_causal: bool = ...,
    key_padding_mask: torch.Tensor | None = ...,
    dropout_p: float = ...,
    return_lse: Literal[True],
    check_finite: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def block_sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    sparse_config: SparsePatternConfig,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention restricted by a block layout in every branch (exact, differentiable).

    Each branch ``(w, r)`` is LongNet's dilated attention, except that query ``t`` may attend key
    ``u`` only when ``sparse_config``'s layout allows their blocks of sub-problem rows
    (``((t mod w) div r) div block_size``); branches merge by their log-sum-exp. With
    ``pattern_type="dense"`` this is exactly
    [`dilated_attention`][dilated.core.dilated_attention].

    Args:
        q: ``(batch, seq, heads, head_dim)``, float16/bfloat16/float32/float64.
        k: ``(batch, seq, kv_heads, head_dim)``, ``heads % kv_heads == 0`` (grouped-query
            attention: query head ``j`` reads key/value head ``j // (heads // kv_heads)``).
        v: shaped like ``k``.
        segment_lengths: ``w_i`` of each branch; the last segment may be shorter.
        dilation_rates: ``r_i`` of each branch, ``w_i % r_i == 0``.
        sparse_config: the layout ([`SparsePatternConfig`][dilated.core.config.SparsePatternConfig]).
        scale: softmax scale, default ``head_dim ** -0.5``.
        is_causal: query ``t`` sees only keys ``u <= t``.
        key_padding_mask: bool ``(batch, seq)``, True for real tokens.
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation).
        return_lse: also return the merged log-sum-exp (not differentiable).
        check_finite: raise ``ValueError`` on NaN/Inf inputs (a device sync).

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``; with ``return_lse``,
        also ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs). A query whose
        every block is outside the layout in every branch gets ``out = 0`` and ``lse = -inf``,
        with finite gradients.
    """
    if not isinstance(sparse_config, SparsePatternConfig):
        raise TypeError(
            f"sparse_config must be a SparsePatternConfig, got {type(sparse_config).__name__}"
        )
    ws, rs, softmax_scale = prepare_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        check_finite_inputs=check_finite,
    )
    layouts = branch_layouts(sparse_config, ws, rs)
    seed = dropout_seed_value(draw_dropout_seed(dropout_p))
    out, lse = _BlockSparseDilatedAttention.apply(
        q,
        k,
        v,
        layouts,
        sparse_config.block_size,
        softmax_scale,
        is_causal,
        key_padding_mask,
        dropout_p,
        seed,
    )
    return (out, lse) if return_lse else out
