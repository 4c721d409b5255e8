"""The public op of dilated-sparse: validation, the block layouts, and a custom autograd function."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch

from dilated.core.branches import compute_dtype
from dilated.core.config import SparsePatternConfig
from dilated.core.functional import prepare_call
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.core.sparsity import BranchLayout, resolve_layouts
from dilated.kernels.custom_op import register_attention_autograd
from dilated.sparse.engine import block_sparse_backward, block_sparse_forward

__all__ = ["attention_by_key", "block_sparse_dilated_attention", "branch_layouts", "config_key"]

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


#: Configs by the key the custom op carries (a config is not an op argument); weak, so that a
#: dead config's id can never name a new one.
_CONFIGS: weakref.WeakValueDictionary[str, SparsePatternConfig] = weakref.WeakValueDictionary()


def config_key(config: SparsePatternConfig) -> str:
    """The key under which the custom op finds ``config`` (registered on first use)."""
    key = f"{type(config).__name__}@{id(config):x}"
    _CONFIGS[key] = config
    return key


def _layouts(
    key: str, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[BranchLayout, ...], int]:
    """The branch layouts and block size of the config registered under ``key``."""
    config = _CONFIGS.get(key)
    if config is None:
        raise ValueError(f"no live SparsePatternConfig has the key {key!r}")
    return branch_layouts(config, segment_lengths, dilation_rates), config.block_size


_OPTIONS = (
    "str layout_key, int[] segment_lengths, int[] dilation_rates, float scale, bool is_causal, "
    "float dropout_p"
)


@torch.library.custom_op(
    "dilated_sparse::attention",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? seed, {_OPTIONS}) "
    "-> (Tensor, Tensor)",
)
def _attention(
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
    )
    # Outputs may not alias inputs.
    return out, lse


@_attention.register_fake
def _attention_fake(q: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=compute_dtype(q.dtype))


@torch.library.custom_op(
    "dilated_sparse::attention_backward",
    mutates_args=(),
    schema="(Tensor d_out, Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor out, "
    f"Tensor lse, Tensor? seed, {_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward(
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
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_attention_backward.register_fake
def _attention_backward_fake(
    d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(_attention, _attention_backward, lse_grad=False)


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
        key_padding_mask: bool ``(batch, seq)``, True for real tokens.
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
    if not isinstance(sparse_config, SparsePatternConfig):
        raise TypeError(
            f"sparse_config must be a SparsePatternConfig, got {type(sparse_config).__name__}"
        )
    return attention_by_key(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        layout_key=config_key(sparse_config),
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
    the layout given by its [`config_key`][dilated.sparse.functional.config_key]: what the
    modules call, so that ``torch.compile`` sees a string, not a config object."""
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
    out, lse = torch.ops.dilated_sparse.attention(
        q,
        k,
        v,
        key_padding_mask,
        draw_dropout_seed(dropout_p),
        layout_key,
        list(ws),
        list(rs),
        softmax_scale,
        is_causal,
        dropout_p,
    )
    return (out, lse) if return_lse else out
