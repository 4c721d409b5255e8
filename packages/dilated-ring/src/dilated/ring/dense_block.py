"""The dense block body: this rank's queries against blocks of phase rows, as calls of the
shared primitive.

For a branch whose segments span ranks, each rank's *block* holds the phase rows of its keys and
values (positions ``t = p (mod r)`` for the key/value heads the phase's query heads read: ``1/r``
of K/V; [`dilated.ring.layout`][dilated.ring.layout] says which), packed by a few strided copies.
Every block in hand is a few calls of the shared primitive
([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]) on strided views of
the shard and of the block, phases and segments batched into one call where the strides allow
([`dilated.ring.dense_calls`][dilated.ring.dense_calls] plans them once per shard geometry),
merged into float32 accumulators ([`merge_into`][dilated.kernels.merge.merge_into]). The
backward pass evaluates every call's gradient with the FINAL output and LSE, so nothing is
stored between the passes but the output and the LSE. A schedule of
[`dilated.ring.schedules`][dilated.ring.schedules] moves the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from dilated.core.branches import compute_dtype, head_index
from dilated.kernels.accumulate import add_into
from dilated.kernels.merge import merge_into
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.ring.dense_calls import (
    JOINED,
    BlockCalls,
    DenseCall,
    PackCopy,
    block_calls,
    block_units,
    joined_layouts,
    pack_copies,
)
from dilated.ring.plan import RingPlan, SpanningBranch
from dilated.ring.schedule import Held

__all__ = ["BackwardRows", "DenseBlockBody", "ForwardRows"]


@dataclass(frozen=True)
class ForwardRows:
    """This rank's query rows in the forward pass, all contiguous: ``q`` ``(batch, seq / P,
    heads, head_dim)`` and the float32 accumulators the calls merge into, ``acc`` (shaped like
    ``q``) and ``acc_lse`` ``(batch, seq / P, heads)``."""

    q: torch.Tensor
    acc: torch.Tensor
    acc_lse: torch.Tensor


@dataclass(frozen=True)
class BackwardRows:
    """This rank's rows in the backward pass, all contiguous: ``q``, the FINAL ``out`` and
    ``lse`` ``(batch, seq / P, heads)``, the output gradient ``d_out`` and the float32
    gradients ``dq``, ``dk``, ``dv`` the calls add into."""

    q: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    d_out: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _view(
    x: torch.Tensor, size: tuple[int, ...], stride: tuple[int, ...], offset: int, d: int
) -> torch.Tensor:
    """The view of contiguous ``x`` whose dims have ``size``/``stride`` in units of ``d``
    elements, ``head_dim`` last."""
    return x.as_strided((*size, d), (*(s * d for s in stride), 1), x.storage_offset() + offset * d)


def _lse_view(lse: torch.Tensor, c: DenseCall) -> torch.Tensor:
    """``(batch, heads, rows)`` of an LSE ``(batch, seq / P, heads)`` for a call."""
    s = c.q_stride
    return lse.as_strided(
        (c.batch, c.heads, c.q_rows), (s[0], s[2], s[1]), lse.storage_offset() + c.q_offset
    )


def _q_view(x: torch.Tensor, c: DenseCall, d: int) -> torch.Tensor:
    return _view(x, (c.batch, c.q_rows, c.heads), c.q_stride, c.q_offset, d)


def _k_view(block: torch.Tensor, c: DenseCall, offset: int, d: int) -> torch.Tensor:
    return _view(block, (c.batch, c.k_rows, c.kv_heads), c.k_stride, c.k_offset + offset, d)


def _gathered(x: torch.Tensor, c: DenseCall) -> torch.Tensor:
    """Keys as the call's query heads read them (one key/value head per query head)."""
    if c.kv_index is None:
        return x
    index = head_index(c.kv_index, x.device)
    return x[:, :, index] if isinstance(index, slice) else x.index_select(2, index)


def _add_keys(target: torch.Tensor, grad: torch.Tensor, c: DenseCall) -> None:
    """Add a call's key gradient into its view of a block's gradient."""
    if c.kv_index is None:
        add_into(target, grad)
        return
    index = head_index(c.kv_index, target.device)
    if isinstance(index, slice):
        target[:, :, index] += grad.to(target.dtype)
    else:
        target.index_add_(2, index, grad.to(target.dtype))


def _copy_views(
    shard: torch.Tensor, half: torch.Tensor, cp: PackCopy, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    size = cp.size if cp.kv_index is None else (*cp.size[:2], len(cp.kv_index))
    shard_size = cp.size
    return (
        _view(shard, shard_size, cp.shard_stride, cp.shard_offset, d),
        _view(half, size, cp.block_stride, cp.block_offset, d),
    )


class DenseBlockBody:
    """Dense attention of this rank's queries over the blocks of one spanning branch (a
    [`BlockBody`][dilated.ring.schedule.BlockBody]).

    Args:
        plan: the call.
        branch: the branch, on this rank.
        k, v: this rank's contiguous key/value shards ``(batch, seq / P, kv_heads, head_dim)``.
        rows: [`ForwardRows`][dilated.ring.dense_block.ForwardRows] or
            [`BackwardRows`][dilated.ring.dense_block.BackwardRows]: the pass.
        key_mask: the contiguous whole-sequence ``(batch, seq)`` key mask (True = a key that
            may be attended) or None.
    """

    same_block_for_every_peer = True

    def __init__(
        self,
        plan: RingPlan,
        branch: SpanningBranch,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: ForwardRows | BackwardRows,
        key_mask: torch.Tensor | None,
    ) -> None:
        self.plan, self.branch, self.rows, self.key_mask = plan, branch, rows, key_mask
        self.k, self.v = k, v
        self.rank = plan.rank
        self.members = branch.members
        self.block_dtype = k.dtype
        self.grad_dtype = compute_dtype(rows.q.dtype)
        self.batch, self.head_dim = k.shape[0], k.shape[-1]

    def block_numel(self, src: int, dst: int) -> int:
        return 2 * self.head_dim * block_units(self.branch.layouts[src], self.batch)[-1]

    @cached_property
    def own(self) -> torch.Tensor:
        """This rank's block (packed once per pass)."""
        numel = self.block_numel(self.rank, self.rank)
        flat = torch.empty(numel, dtype=self.k.dtype, device=self.k.device)
        d, halves = self.head_dim, flat.chunk(2)
        for cp in pack_copies(self.branch, self.batch):
            for x, half in zip((self.k, self.v), halves):
                src, dst = _copy_views(x, half, cp, d)
                if cp.kv_index is not None:
                    src = src.index_select(2, head_index(cp.kv_index, x.device))  # type: ignore[arg-type]
                dst.copy_(src)
        return flat

    def block_for(self, dst: int) -> torch.Tensor:
        return self.own

    def _calls(self, src: int) -> BlockCalls:
        return block_calls(self.branch, src, self.batch, self.key_mask is not None)

    def _joined(self, held: Sequence[Held]) -> torch.Tensor | None:
        """The members' blocks as one (all-gather, contiguous shards), or None."""
        if len(held) < 2 or joined_layouts(self.branch) is None:
            return None
        by_src = {h.src: h.block for h in held}
        first = self.branch.mine[0]
        part = (2, len(self.branch.mine), self.batch, first.rows, len(first.kv_heads), -1)
        blocks = [by_src[m].view(part) for m in self.members]
        return torch.cat(blocks, dim=3).reshape(-1)

    def forward(self, held: Sequence[Held]) -> None:
        joined = self._joined(held)
        if joined is not None:
            self._forward(self._calls(JOINED), joined, JOINED)
            return
        for h in held:
            self._forward(self._calls(h.src), h.block, h.src)

    def _forward(self, plan: BlockCalls, block: torch.Tensor, src: int) -> None:
        rows, d, p = self.rows, self.head_dim, self.plan
        assert isinstance(rows, ForwardRows)
        mask = self.key_mask
        for c in plan.calls:
            out, lse = subproblem_attention(
                _q_view(rows.q, c, d),
                _gathered(_k_view(block, c, 0, d), c),
                _gathered(_k_view(block, c, plan.half, d), c),
                scale=p.scale,
                is_causal=c.causal,
                key_mask=None if mask is None else self._mask_view(mask, c),
                dropout_p=p.dropout_p,
                dropout_seed=p.seed(self.branch.index, src, c.number),
            )
            merge_into(_q_view(rows.acc, c, d), _lse_view(rows.acc_lse, c), out, lse)

    @staticmethod
    def _mask_view(mask: torch.Tensor, c: DenseCall) -> torch.Tensor:
        return mask.as_strided(
            (c.batch, c.k_rows), c.mask_stride, mask.storage_offset() + c.mask_offset
        )

    def backward(self, held: Sequence[Held]) -> None:
        joined = self._joined(held)
        if joined is not None:
            grad = torch.zeros(joined.shape, dtype=self.grad_dtype, device=joined.device)
            self._backward(self._calls(JOINED), joined, grad, JOINED)
            first = self.branch.mine[0]
            size = len(self.branch.mine), self.batch, len(self.members), first.rows
            split = grad.view(2, *size, len(first.kv_heads), self.head_dim)
            by_member = {m: split[:, :, :, i].reshape(-1) for i, m in enumerate(self.members)}
            for h in held:
                h.grad = by_member[h.src]
            return
        for h in held:
            if h.grad is None:
                h.grad = torch.zeros(h.block.shape, dtype=self.grad_dtype, device=h.block.device)
            self._backward(self._calls(h.src), h.block, h.grad, h.src)

    def _backward(
        self, plan: BlockCalls, block: torch.Tensor, grad: torch.Tensor, src: int
    ) -> None:
        rows, d, p = self.rows, self.head_dim, self.plan
        assert isinstance(rows, BackwardRows)
        mask = self.key_mask
        for c in plan.calls:
            gq, gk, gv = subproblem_attention_backward(
                _q_view(rows.d_out, c, d),
                _q_view(rows.q, c, d),
                _gathered(_k_view(block, c, 0, d), c),
                _gathered(_k_view(block, c, plan.half, d), c),
                _q_view(rows.out, c, d),
                _lse_view(rows.lse, c),
                scale=p.scale,
                is_causal=c.causal,
                key_mask=None if mask is None else self._mask_view(mask, c),
                dropout_p=p.dropout_p,
                dropout_seed=p.seed(self.branch.index, src, c.number),
            )
            add_into(_q_view(rows.dq, c, d), gq)
            _add_keys(_k_view(grad, c, 0, d), gk, c)
            _add_keys(_k_view(grad, c, plan.half, d), gv, c)

    def add_home(self, grads: Sequence[tuple[int, torch.Tensor]]) -> None:
        rows = self.rows
        assert isinstance(rows, BackwardRows)
        total = grads[0][1]
        for _, g in grads[1:]:
            total = total + g
        d, halves = self.head_dim, total.chunk(2)
        for cp in pack_copies(self.branch, self.batch):
            for x, half in zip((rows.dk, rows.dv), halves):
                dst, src = _copy_views(x, half, cp, d)
                if cp.kv_index is None:
                    dst += src
                else:
                    dst.index_add_(2, head_index(cp.kv_index, x.device), src)  # type: ignore[arg-type]
