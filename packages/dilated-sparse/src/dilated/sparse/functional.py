"""The public op of dilated-sparse: validation and a custom autograd function.

The op ``dilated_sparse::attention`` takes the layout by its key
([`layout_key`][dilated.sparse.layouts.layout_key], see [`dilated.sparse.layouts`][dilated.sparse.layouts]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch

from dilated.core.branches import compute_dtype
from dilated.core.config import SparsePatternConfig
from dilated.core.functional import prepare_call
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.kernels.custom_op import define_attention_op
from dilated.sparse.engine import block_sparse_backward, block_sparse_forward

# The layouts' names, public here since the op was one module.
from dilated.sparse.layouts import ResolvedLayouts as ResolvedLayouts
from dilated.sparse.layouts import _layouts, resolve
from dilated.sparse.layouts import branch_layouts as branch_layouts
from dilated.sparse.layouts import check_sparse_config as check_sparse_config
from dilated.sparse.layouts import layout_key as layout_key

__all__ = [
    "ResolvedLayouts",
    "attention_by_key",
    "block_sparse_dilated_attention",
    "branch_layouts",
    "check_sparse_config",
    "layout_key",
    "resolve",
    "sparse_op",
]


_OPTIONS = (
    "str layout_key, int[] segment_lengths, int[] dilation_rates, float scale, bool is_causal, "
    "float dropout_p"
)


def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    layout_key: str,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    layouts, block_size = _layouts(layout_key, segment_lengths, dilation_rates)
    out, lse = block_sparse_forward(
        q,
        k,
        v,
        layouts,
        block_size,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_mask,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed_value(seed),
        layout_key=layout_key,
    )
    # Outputs may not alias inputs.
    return out, lse


def _attention_backward_impl(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor | None,
    layout_key: str,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layouts, block_size = _layouts(layout_key, segment_lengths, dilation_rates)
    dq, dk, dv = block_sparse_backward(
        d_out,
        q,
        k,
        v,
        out,
        lse,
        layouts,
        block_size,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_mask,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed_value(seed),
        layout_key=layout_key,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_attend = define_attention_op(
    "dilated_sparse::attention",
    _OPTIONS,
    _attention_impl,
    _attention_backward_impl,
    lse_grad=False,
    lse_dtype=compute_dtype,
)


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
    check_finite: bool | None = ...,
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
    check_finite: bool | None = ...,
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
    check_finite: bool | None = None,
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
        key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
            ``-inf``) at the keys to ignore (padding); see
            [`check_key_padding_mask`][dilated.core.checks.check_key_padding_mask].
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation).
        return_lse: also return the merged log-sum-exp (not differentiable).
        check_finite: raise ``ValueError`` on NaN/Inf inputs (costs a device sync); None
            (default) reads the environment variable ``DILATED_CHECK_FINITE`` (off when unset),
            see [`resolve_check_finite`][dilated.core.checks.resolve_check_finite].

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``; with ``return_lse``,
        also ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs). A query whose
        every block is outside the layout in every branch gets ``out = 0`` and ``lse = -inf``,
        with finite gradients.
    """
    # The branches are checked here first, by the function prepare_call uses.
    key = resolve(sparse_config, segment_lengths, dilation_rates).key
    return attention_by_key(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        layout_key=key,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        return_lse=return_lse,
        check_finite=check_finite,
    )


def attention_by_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    layout_key: str,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    check_finite: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[`block_sparse_dilated_attention`][dilated.sparse.block_sparse_dilated_attention] with
    the layout given by its [`layout_key`][dilated.sparse.layouts.layout_key] (made for these
    branches): what the modules call, so that ``torch.compile`` sees a string, not a config
    object."""
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
    out, lse = sparse_op(q, k, v, ws, rs, layout_key, softmax_scale, is_causal, key_mask, dropout_p)
    return (out, lse) if return_lse else out


def sparse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    layout_key: str,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the custom op ``dilated_sparse::attention`` on checked arguments (see
    [`prepare_call`][dilated.core.functional.prepare_call]): ``q`` ``(batch, seq, heads,
    head_dim)``, ``lse`` ``(batch, heads, seq)`` float32 (float64 for float64 inputs)."""
    out, lse = _attend(
        q,
        k,
        v,
        key_padding_mask,
        draw_dropout_seed(dropout_p),
        layout_key,
        list(segment_lengths),
        list(dilation_rates),
        scale,
        is_causal,
        dropout_p,
    )
    return out, lse
