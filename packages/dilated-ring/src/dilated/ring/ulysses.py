"""Ulysses strategy: trade the sequence shard for a head shard with two all-to-alls.

Each rank holds ``(batch, seq / P, heads, head_dim)``. An all-to-all gives every rank the whole
sequence for ``heads / P`` of the heads (DeepSpeed-Ulysses); the single-GPU dilated attention
of dilated-kernels runs there, and a second all-to-all returns the output to the sequence
shards. The backward pass is autograd through the attention and through the all-to-all, whose
backward is the inverse exchange.

The phase of a head in branch ``(w, r)`` is its *global* index mod ``r`` (the docs' Concepts page). Rank ``c``
holds the global heads ``c h / P + j``; when ``c h / P`` is a multiple of every ``r_i`` local and
global phases agree and one call of the single-GPU op does all branches. Otherwise (and with
dropout, whose masks are drawn from a seed so that the backward pass replays them) the heads
keep their global phases through [`dilated.kernels.partial`][dilated.kernels.partial]'s
``head_offset``: one call of the shared sub-problem primitive per branch, phase and run of
segments.

Grouped-query attention: key/value heads are split over the ranks like the query heads when
``kv_heads % P == 0``; otherwise each key/value head is repeated for the query heads that read it
before the exchange (``heads`` key/value heads travel; their gradients are summed back by
autograd).
"""

from __future__ import annotations

from typing import Any

import torch

from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.kernels import dilated_attention as kernels_dilated_attention
from dilated.kernels.partial import dilated_attention_backward, dilated_attention_forward
from dilated.ring.comm import Transport, gather_key_padding_mask
from dilated.ring.sharding import positions

__all__ = ["check_ulysses_heads", "global_phase_attention", "ulysses_attention", "ulysses_kv_heads"]


def check_ulysses_heads(heads: int, world_size: int) -> None:
    """Raise ``ValueError`` unless the query heads split evenly over the ranks."""
    if heads % world_size != 0:
        raise ValueError(
            f"strategy='ulysses' splits the heads over the ranks: heads={heads} must be divisible "
            f"by the world size {world_size}; use strategy='ring' or 'allgather' otherwise"
        )


def ulysses_kv_heads(heads: int, kv_heads: int, world_size: int) -> int:
    """Key/value heads that travel: ``kv_heads`` when they split over the ranks, else ``heads``."""
    return kv_heads if kv_heads % world_size == 0 else heads


class _AllToAll(torch.autograd.Function):
    """Split ``x`` along ``scatter_dim`` over the ranks and concatenate what arrives along
    ``gather_dim``; the backward pass is the same exchange with the two dims swapped."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scatter_dim: int,
        gather_dim: int,
        comm: Transport,
    ) -> torch.Tensor:
        ctx.dims = (scatter_dim, gather_dim)  # type: ignore[attr-defined]
        ctx.comm = comm  # type: ignore[attr-defined]
        return _exchange(x, scatter_dim, gather_dim, comm)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        scatter_dim, gather_dim = ctx.dims  # type: ignore[attr-defined]
        return _exchange(grad, gather_dim, scatter_dim, ctx.comm), None, None, None  # type: ignore[attr-defined]


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, comm: Transport) -> torch.Tensor:
    world = comm.world_size
    chunks = list(torch.chunk(x, world, dim=scatter_dim))
    received = comm.all_to_all(chunks)
    out = torch.cat(received, dim=gather_dim)
    for t in received:
        comm.release(t)
    return out


def _sequence_order(seq: int, world: int, mode: str, device: torch.device) -> torch.Tensor:
    """Global positions of the rows of the rank-ordered concatenation of all shards."""
    return torch.cat([positions(seq, i, world, mode, device=device) for i in range(world)])


class _HeadSliceAttention(torch.autograd.Function):
    """Dilated attention of a head slice that keeps its global phases, on the shared primitive
    ([`dilated.kernels.partial`][dilated.kernels.partial]); dropout replays its seed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        options: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = dilated_attention_forward(q, k, v, key_padding_mask=key_padding_mask, **options)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_out: torch.Tensor, _d_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = dilated_attention_backward(
            d_out, q, k, v, out, lse, key_padding_mask=mask, **ctx.options
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def global_phase_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    head_offset: int,
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of whole sequences for the heads ``head_offset + j`` of a larger layer.

    Args:
        q: ``(batch, seq, heads_local, head_dim)``; local head ``j`` is global head
            ``head_offset + j`` and takes the phase ``(head_offset + j) mod r_i``.
        k, v: ``(batch, seq, kv_heads_local, head_dim)``; local query head ``j`` reads local kv
            head ``j // (heads_local // kv_heads_local)``.
        segment_lengths, dilation_rates, scale, is_causal, dropout_p: validated arguments as in
            [`dilated_attention`][dilated.core.functional.dilated_attention].
        key_padding_mask: bool ``(batch, seq)`` in the internal form (True = a key that may be
            attended) that [`prepare_call`][dilated.core.functional.prepare_call] returns, or None.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` in q's dtype (differentiable), ``lse``
        ``(batch, heads_local, seq)`` in the compute dtype.
    """
    aligned = all(head_offset % r == 0 for r in dilation_rates)
    if aligned and dropout_p == 0.0:
        # Local and global phases agree: the single-GPU op as it is, with its own autograd. It
        # is public, so it takes the public mask (True = padding) and converts it back itself.
        padding = None if key_padding_mask is None else ~key_padding_mask
        out, lse = kernels_dilated_attention(
            q, k, v, segment_lengths, dilation_rates, scale=scale, is_causal=is_causal,
            key_padding_mask=padding, return_lse=True, check_finite=False,
        )  # fmt: skip
        return out, lse
    options = {
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "scale": scale,
        "is_causal": is_causal,
        "dropout_p": dropout_p,
        "dropout_seed": dropout_seed_value(draw_dropout_seed(dropout_p)),
        "head_offset": 0 if aligned else head_offset,
    }
    out, lse = _HeadSliceAttention.apply(q, k, v, key_padding_mask, options)
    return out, lse


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    load_balance: str,
    rank: int,
    world_size: int,
    comm: Transport,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's rows of dilated attention of the sharded sequence, by two all-to-alls.

    Args:
        q: this rank's shard ``(batch, seq / P, heads, head_dim)`` (``heads % P == 0``).
        k, v: ``(batch, seq / P, kv_heads, head_dim)``.
        segment_lengths, dilation_rates, scale, is_causal, dropout_p: validated, as in
            [`dilated.core.functional.dilated_attention`][dilated.core.functional.dilated_attention].
        key_padding_mask: this rank's ``(batch, seq / P)`` bool mask in the internal form (True =
            a key that may be attended, as [`CheckedCall.key_mask`][dilated.ring.validation.CheckedCall]
            holds it) or None; gathered once.
        load_balance: the sharding of q/k/v (any of [`dilated.ring.sharding`][dilated.ring.sharding]).
        rank, world_size: this rank in ``comm.group`` and its size.
        comm: transfers (timeout, byte counters).
        return_lse: also return this rank's ``(batch, heads, seq / P)`` lse (one more exchange).

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (differentiable), ``lse`` or None.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    hl = heads // world_size

    def attend(
        qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return global_phase_attention(
            qh,
            kh,
            vh,
            segment_lengths,
            dilation_rates,
            rank * hl,
            scale=scale,
            is_causal=is_causal,
            key_padding_mask=mask,
            dropout_p=dropout_p,
        )

    if world_size == 1:
        out, lse = attend(q, k, v, key_padding_mask)
        return out, (lse if return_lse else None)
    if ulysses_kv_heads(heads, kv_heads, world_size) != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        v = v.repeat_interleave(heads // kv_heads, dim=2)
    seq = q.shape[1] * world_size
    order = _sequence_order(seq, world_size, load_balance, q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq, device=q.device)

    def exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        moved: torch.Tensor = _AllToAll.apply(x, scatter_dim, gather_dim, comm)
        return moved

    def to_heads(x: torch.Tensor) -> torch.Tensor:
        # (b, s, H, d) -> (b, n, H / P, d) in global position order
        whole = exchange(x, 2, 1)
        return whole if load_balance == "contiguous" else whole.index_select(1, inverse)

    mask = None
    if key_padding_mask is not None:
        mask = gather_key_padding_mask(key_padding_mask, load_balance, world_size, comm)
    out_h, lse_h = attend(to_heads(q), to_heads(k), to_heads(v), mask)
    if load_balance != "contiguous":
        out_h = out_h.index_select(1, order)
    out = exchange(out_h, 1, 2)
    if not return_lse:
        return out, None
    lse_rows = lse_h.detach().transpose(1, 2)  # (b, n, H / P)
    if load_balance != "contiguous":
        lse_rows = lse_rows.index_select(1, order)
    return out, _exchange(lse_rows.contiguous(), 1, 2, comm).transpose(1, 2)
