"""The public op of dilated-sparse: validation, the block layouts, and a custom autograd function.

A custom op takes no Python objects, so the layout reaches ``dilated_sparse::attention`` as a
string that holds the layout itself ([`layout_key`][dilated.sparse.functional.layout_key]), not
a reference to its config: the op's arguments, which autograd saves for the backward pass, are
all that pass needs, and equal layouts give equal strings in any process.
"""

from __future__ import annotations

import base64
import binascii
import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from dilated.core.branches import compute_dtype
from dilated.core.checks import ArgumentTypeError, check_branches
from dilated.core.config import SparsePatternConfig
from dilated.core.functional import prepare_call
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.core.sparsity import BranchLayout, block_count, resolve_layouts
from dilated.kernels.custom_op import register_attention_autograd
from dilated.sparse.engine import block_sparse_backward, block_sparse_forward

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


def check_sparse_config(config: object) -> SparsePatternConfig:
    """Return ``config`` if it is a [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig].

    Raises:
        ArgumentTypeError: anything else; the message names ``sparse_config``.
    """
    if not isinstance(config, SparsePatternConfig):
        raise ArgumentTypeError(
            f"sparse_config must be a SparsePatternConfig, got {type(config).__name__}"
        )
    return config


@dataclass(frozen=True)
class ResolvedLayouts:
    """A layout resolved for one branch list.

    Attributes:
        layouts: every branch's [`BranchLayout`][dilated.core.sparsity.BranchLayout].
        block_size: rows per block.
        key: [`layout_key`][dilated.sparse.functional.layout_key] of them: what the custom op
            takes (it holds the tables themselves).
    """

    layouts: tuple[BranchLayout, ...]
    block_size: int
    key: str


#: The version of the key format; a key of another format is refused, never misread.
_KEY_PREFIX = "dilated-sparse-layout-v1"


def layout_key(layouts: Sequence[BranchLayout], block_size: int) -> str:
    """The string the custom op takes a layout by: it holds the layout's content.

    ``"dilated-sparse-layout-v1:<block_size>:<w>,<r>,<nb>;...:<tables>"``, the tables being every
    branch's bool ``(nb, nb)`` table, one byte a block, zlib-compressed and base64-encoded (a
    band or a structured layout compresses to a few bytes). Equal layouts give equal keys in any
    process, and a key never names another layout: the op's saved state (its arguments) is all
    its backward pass needs, however many other configs were made, freed or called since.
    """
    branches = ";".join(f"{lay.segment_length},{lay.dilation_rate},{lay.nb}" for lay in layouts)
    tables = torch.cat([lay.blocks.reshape(-1) for lay in layouts]).to(torch.bool)
    packed = base64.b64encode(zlib.compress(tables.numpy().tobytes())).decode("ascii")
    return f"{_KEY_PREFIX}:{block_size}:{branches}:{packed}"


@functools.lru_cache(maxsize=64)
def _decode(key: str) -> ResolvedLayouts:
    """The layouts a [`layout_key`][dilated.sparse.functional.layout_key] holds (cached: an
    evicted key is decoded again, never lost)."""
    try:
        prefix, block, branches, packed = key.split(":")
        if prefix != _KEY_PREFIX:
            raise ValueError(prefix)
        block_size = int(block)
        shapes = [tuple(int(x) for x in part.split(",")) for part in branches.split(";")]
        raw = zlib.decompress(base64.b64decode(packed, validate=True))
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if any(len(s) != 3 or s[2] != block_count(s[0], s[1], block_size) for s in shapes):
            raise ValueError(branches)
        if flat.numel() != sum(nb * nb for _, _, nb in shapes) or bool((flat > 1).any()):
            raise ValueError(packed)
    except (ValueError, zlib.error, binascii.Error) as exc:
        shown = key if len(key) <= 80 else key[:77] + "..."
        raise ValueError(
            f"layout_key must be a key made by dilated.sparse.functional.layout_key, got {shown!r}"
        ) from exc
    layouts, at = [], 0
    for w, r, nb in shapes:
        blocks = flat[at : at + nb * nb].reshape(nb, nb).to(torch.bool)
        layouts.append(BranchLayout(w, r, w // r, nb, None, None, blocks))
        at += nb * nb
    return ResolvedLayouts(tuple(layouts), block_size, key)


@dataclass(frozen=True)
class _Content:
    """A config by what determines its layouts: its fields, and its custom tables' bytes or its
    layout function (which the cache entry holds, so that it stays that very function)."""

    fields: tuple[object, ...]
    config: SparsePatternConfig = field(compare=False, hash=False)


def _content(config: SparsePatternConfig) -> _Content:
    custom = config.layout
    token: object = custom
    # A config holds private CPU copies of its tables.
    if isinstance(custom, torch.Tensor):
        token = (tuple(custom.shape), custom.numpy().tobytes())
    elif isinstance(custom, tuple):
        token = tuple((tuple(t.shape), t.numpy().tobytes()) for t in custom)
    fields = (
        config.pattern_type,
        config.sparsity_ratio,
        config.block_size,
        config.local_window_size,
        config.global_tokens,
        token,
    )
    return _Content(fields, config)


@functools.lru_cache(maxsize=64)
def _resolved(
    content: _Content, segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...]
) -> ResolvedLayouts:
    config = content.config
    layouts = resolve_layouts(config, segment_lengths, dilation_rates)
    return ResolvedLayouts(layouts, config.block_size, layout_key(layouts, config.block_size))


def resolve(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> ResolvedLayouts:
    """[`resolve_layouts`][dilated.core.sparsity.resolve_layouts] and its
    [`layout_key`][dilated.sparse.functional.layout_key], cached by the config's content and
    the branches (equal configs share an entry; a config is frozen, so its layouts never change).

    Raises:
        ArgumentTypeError: ``config`` is not a ``SparsePatternConfig``.
        ValueError: bad branches, or a custom layout that does not fit them.
    """
    ws, rs = check_branches(segment_lengths, dilation_rates)
    content = _content(check_sparse_config(config))
    try:
        hash(content)
    except TypeError:  # a layout callable that defines == but no hash: resolved every call
        return _resolved.__wrapped__(content, ws, rs)
    return _resolved(content, ws, rs)


def branch_layouts(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[BranchLayout, ...]:
    """The layouts of [`resolve`][dilated.sparse.functional.resolve]."""
    return resolve(config, segment_lengths, dilation_rates).layouts


def _layouts(
    key: str, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[BranchLayout, ...], int]:
    """The branch layouts and block size ``key`` holds, checked against the call's branches."""
    resolved = _decode(key)
    held = [(lay.segment_length, lay.dilation_rate) for lay in resolved.layouts]
    if held != list(zip(segment_lengths, dilation_rates)):
        raise ValueError(
            f"layout_key holds the layouts of the branches (w, r) = {held}, but the call has "
            f"segment_lengths={list(segment_lengths)}, dilation_rates={list(dilation_rates)}"
        )
    return resolved.layouts, resolved.block_size


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
        layout_key=layout_key,
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
        layout_key=layout_key,
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
    the layout given by its [`layout_key`][dilated.sparse.functional.layout_key] (made for these
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
    out, lse = torch.ops.dilated_sparse.attention(
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
