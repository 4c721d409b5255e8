"""The dense block body: this rank's queries against blocks of phase rows, as calls of the
shared primitive.

For a branch whose segments span ranks, each rank's *block* holds the phase rows of its keys and
values (positions ``t = p (mod r)`` for the key/value heads the phase's query heads read: ``1/r``
of K/V; [`dilated.ring.layout`][dilated.ring.layout] says which). Every block in hand is, for each
phase, a few dense calls of the shared primitive
([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]) on strided views of
the shard and of the block, merged into float32 accumulators
([`merge_into`][dilated.kernels.merge.merge_into]). The backward pass evaluates every call's
gradient with the FINAL output and LSE, so nothing is stored between the passes but the output
and the LSE. A schedule of [`dilated.ring.schedules`][dilated.ring.schedules] moves the blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from dilated.core.branches import compute_dtype, head_index
from dilated.kernels.merge import merge_into
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.ring.layout import PhaseLayout, Piece, pair_calls
from dilated.ring.plan import RingPlan, SpanningBranch
from dilated.ring.schedule import Held

__all__ = ["BackwardRows", "DenseBlockBody", "ForwardRows"]


def _block_numel(layouts: tuple[PhaseLayout, ...], batch: int, head_dim: int) -> int:
    return 2 * sum(batch * ph.rows * len(ph.kv_heads) * head_dim for ph in layouts)


def _select_heads(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    index = head_index(heads, x.device)
    return x[:, :, index] if isinstance(index, slice) else x.index_select(2, index)


def _kv_phase_view(
    x: torch.Tensor, layouts: tuple[PhaseLayout, ...], heads: int
) -> torch.Tensor | None:
    """The packed layout of ``x``'s phase rows as one view ``(batch, phases, rows, kv_p, d)``,
    or None: when every phase holds all rows ``p, p + r, ...`` of the shard and reads either the
    key/value heads ``p, p + r, ...`` (no grouped-query attention) or all of them."""
    r = layouts[0].heads.step or 1
    s, kv = x.shape[1], x.shape[2]
    if not _batchable(layouts, layouts, s, heads) or layouts[0].rows != s // r:
        return None
    if all(ph.kv_heads == tuple(range(kv)[ph.heads]) for ph in layouts) and kv == heads:
        return _phase_view(x, r)
    if all(ph.kv_heads == tuple(range(kv)) for ph in layouts):
        b, d = x.shape[0], x.shape[3]
        return x.view(b, s // r, r, kv, d)[:, :, : len(layouts)].movedim(2, 1)
    return None


def _pack(
    k: torch.Tensor, v: torch.Tensor, layouts: tuple[PhaseLayout, ...], heads: int
) -> torch.Tensor:
    """Flat ``(batch, F)`` block of the phase rows of k and v (every phase's k, then its v)."""
    kp, vp = (_kv_phase_view(x, layouts, heads) for x in (k, v))
    if kp is not None and vp is not None:
        return torch.stack([kp, vp], dim=1).reshape(k.shape[0], -1)  # one copy for the block
    parts = []
    for x in (k, v):
        for ph in layouts:
            rows = [x[:, pc.local_slice(0, pc.count)] for pc in ph.pieces]
            if rows:
                parts.append(_select_heads(torch.cat(rows, dim=1), ph.kv_heads).flatten(1))
    return torch.cat(parts, dim=1)


def _unpack(
    block: torch.Tensor, layouts: tuple[PhaseLayout, ...], head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views ``(k_p, v_p)`` ``(batch, rows_p, kv_heads_p, head_dim)`` of a packed block."""
    b = block.shape[0]
    sizes = [ph.rows * len(ph.kv_heads) * head_dim for ph in layouts]
    views = torch.split(block, sizes + sizes, dim=1)
    shaped = [
        t.view(b, ph.rows, len(ph.kv_heads), head_dim) for t, ph in zip(views, (*layouts, *layouts))
    ]
    n = len(layouts)
    return list(zip(shaped[:n], shaped[n:]))


def _kv_for_queries(x: torch.Tensor, ph: PhaseLayout) -> torch.Tensor:
    """Key/value rows as the primitive reads them for the phase's query heads."""
    if ph.uniform:
        return x
    # Query heads of the phase read their kv heads in no regular grouping: one per query head.
    return _select_heads(x, ph.kv_index)


def _add_kv_grad(target: torch.Tensor, grad: torch.Tensor, ph: PhaseLayout) -> None:
    if ph.uniform:
        target += grad
    else:
        index = head_index(ph.kv_index, target.device)
        if isinstance(index, slice):
            target[:, :, index] += grad.to(target.dtype)
        else:
            target.index_add_(2, index, grad.to(target.dtype))


@dataclass
class _Block:
    """A block in hand: its owner (``-1``: several members' blocks side by side), their layouts
    and the packed k/v (or their gradients)."""

    src: int
    layouts: tuple[PhaseLayout, ...]
    flat: torch.Tensor
    head_dim: int

    @cached_property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-phase views ``(k_p, v_p)``, for calls that take the phases one at a time."""
        return _unpack(self.flat, self.layouts, self.head_dim)


def _phase_view(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(batch, phases, s / r, heads / phases, ...)`` view of ``x`` ``(batch, s, heads, ...)``:
    phase ``p`` holds rows ``p, p + r, ...`` of heads ``p, p + r, ...`` (no copy).

    A phase's rows and heads are both strided by ``r``, so all phases together are the diagonal
    of the ``(row mod r, head mod r)`` pair: one strided view, and one dense call for them all.
    """
    b, s, h = x.shape[:3]
    rest = x.shape[3:]
    if r >= h:
        grid = x.view(b, s // r, r, h, *rest)[:, :, :h]
        diag = grid.diagonal(dim1=2, dim2=3)  # (b, s / r, *rest, h)
        return diag.movedim(-1, 1).unsqueeze(3)
    grid = x.view(b, s // r, r, h // r, r, *rest)
    return grid.diagonal(dim1=2, dim2=4).movedim(-1, 1)


def _phase_view_lse(lse: torch.Tensor, r: int) -> torch.Tensor:
    """``(batch, phases, heads / phases, s / r)`` view of an lse ``(batch, heads, s)``, phases as
    in `_phase_view`."""
    b, h, s = lse.shape
    if r >= h:
        diag = lse.view(b, h, s // r, r)[..., :h].diagonal(dim1=1, dim2=3)  # (b, s / r, h)
        return diag.movedim(-1, 1).unsqueeze(2)
    grid = lse.view(b, h // r, r, s // r, r)
    return grid.diagonal(dim1=2, dim2=4).movedim(-1, 1)


def _batchable(
    mine: tuple[PhaseLayout, ...], theirs: tuple[PhaseLayout, ...], shard: int, heads: int
) -> bool:
    """Whether every phase of a branch has the same pieces, shifted by its phase (so that the
    phase views above hold them all): rows ``p + m r`` of the shard on both sides."""
    r = mine[0].heads.step or 1
    if shard % r or (r < heads and heads % r):
        return False
    first, first_theirs = mine[0], theirs[0]
    for c, (ph, th) in enumerate(zip(mine, theirs)):
        if not (ph.uniform and th.uniform) or len(ph.kv_heads) != len(first.kv_heads):
            return False
        if ph.rows != first.rows or th.rows != first_theirs.rows:
            return False
        for side, base in ((ph, first), (th, first_theirs)):
            if len(side.pieces) != len(base.pieces):
                return False
            for a, a0 in zip(side.pieces, base.pieces):
                same = (a.segment, a.count, a.packed, a.row, a.row_step, a.local_step)
                if same != (a0.segment, a0.count, a0.packed, a0.row, a0.row_step, a0.local_step):
                    return False
                if a.local_step != r or a.local != a0.local + c or a.pos != a0.pos + c:
                    return False
                # The phase views put phase p at shard rows m r + p.
                if side is ph and a0.local % r:
                    return False
    return True


def _batched_calls(
    plan: RingPlan, mine: tuple[PhaseLayout, ...], block: _Block, branch: int
) -> list[tuple[Piece, Piece, Any, int | None]]:
    """The calls of phase 0, standing for every phase at once (in one fixed order)."""
    out = []
    for ia, a in enumerate(mine[0].pieces):
        for ib, b in enumerate(block.layouts[0].pieces):
            if a.segment != b.segment:
                continue
            for ic, call in enumerate(pair_calls(a, b, plan.is_causal)):
                out.append((a, b, call, plan.seed(branch, -2, block.src, ia, ib, ic)))
    return out


def _phase_keys(flat: torch.Tensor, layouts: tuple[PhaseLayout, ...], d: int) -> list[torch.Tensor]:
    """``(k, v)`` of a packed block as ``(batch, phases, rows, kv_heads_p, head_dim)`` views."""
    b, phases = flat.shape[0], len(layouts)
    rows, kvh = layouts[0].rows, len(layouts[0].kv_heads)
    return list(flat.view(b, 2, phases, rows, kvh, d).unbind(1))


def _phase_mask(
    key_mask: torch.Tensor | None, b: int, piece: Piece, lo: int, hi: int, phases: int
) -> torch.Tensor | None:
    """``(phases, hi - lo)`` key padding mask of rows ``[lo, hi)`` of a key piece, every phase."""
    if key_mask is None:
        return None
    start = piece.pos + lo * piece.pos_step
    idx = start + torch.arange(phases, device=key_mask.device)[:, None]
    idx = idx + piece.pos_step * torch.arange(hi - lo, device=key_mask.device)[None, :]
    return key_mask[b][idx]


def _calls(
    plan: RingPlan, mine: tuple[PhaseLayout, ...], block: _Block, branch: int
) -> list[tuple[int, PhaseLayout, Piece, Piece, Any, int | None]]:
    """Every dense call of this rank's queries against a block: ``(phase index, layout, query
    piece, key piece, call, dropout seed)``, in one fixed order for both passes."""
    out = []
    for c, (ph, theirs) in enumerate(zip(mine, block.layouts)):
        for ia, a in enumerate(ph.pieces):
            for ib, b in enumerate(theirs.pieces):
                if a.segment != b.segment:
                    continue
                for ic, call in enumerate(pair_calls(a, b, plan.is_causal)):
                    seed = plan.seed(branch, c, block.src, ia, ib, ic)
                    out.append((c, ph, a, b, call, seed))
    return out


def _forward_block(
    plan: RingPlan,
    q: torch.Tensor,
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    mine: tuple[PhaseLayout, ...],
    block: _Block,
    branch: int,
    key_mask: torch.Tensor | None,
) -> None:
    r = plan.dilation_rates[branch]
    if _batchable(mine, block.layouts, q.shape[1], plan.heads):
        d, phases = q.shape[-1], len(mine)
        qv, av, lv = _phase_view(q, r), _phase_view(acc, r), _phase_view_lse(acc_lse, r)
        keys_v = _phase_keys(block.flat, block.layouts, d)
        for a, b, call, seed in _batched_calls(plan, mine, block, branch):
            rows = slice(a.local // r + call.q_lo, a.local // r + call.q_hi)
            keys = slice(b.packed + call.k_lo, b.packed + call.k_hi)
            for i in range(q.shape[0]):
                out, lse = subproblem_attention(
                    qv[i, :, rows],
                    keys_v[0][i, :, keys],
                    keys_v[1][i, :, keys],
                    scale=plan.scale,
                    is_causal=call.causal,
                    key_mask=_phase_mask(key_mask, i, b, call.k_lo, call.k_hi, phases),
                    dropout_p=plan.dropout_p,
                    dropout_seed=None if seed is None else seed + i,
                )
                merge_into(av[i, :, rows], lv[i, :, :, rows], out, lse)
        return
    for c, ph, a, b, call, seed in _calls(plan, mine, block, branch):
        rows = a.local_slice(call.q_lo, call.q_hi)
        kp, vp = block.kv[c]
        keys = slice(b.packed + call.k_lo, b.packed + call.k_hi)
        mask = None if key_mask is None else key_mask[:, b.pos_slice(call.k_lo, call.k_hi)]
        out, lse = subproblem_attention(
            q[:, rows, ph.heads],
            _kv_for_queries(kp[:, keys], ph),
            _kv_for_queries(vp[:, keys], ph),
            scale=plan.scale,
            is_causal=call.causal,
            key_mask=mask,
            dropout_p=plan.dropout_p,
            dropout_seed=seed,
        )
        merge_into(acc[:, rows, ph.heads], acc_lse[:, ph.heads, rows], out, lse)


def _backward_block(
    plan: RingPlan,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    dq: torch.Tensor,
    mine: tuple[PhaseLayout, ...],
    block: _Block,
    d_block: torch.Tensor,
    branch: int,
    key_mask: torch.Tensor | None,
) -> None:
    q, out, lse, d_out = tensors
    r = plan.dilation_rates[branch]
    if _batchable(mine, block.layouts, q.shape[1], plan.heads):
        d, phases = q.shape[-1], len(mine)
        views = [_phase_view(x, r) for x in (q, out, d_out, dq)]
        lv = _phase_view_lse(lse, r)
        keys_v = _phase_keys(block.flat, block.layouts, d)
        grads_v = _phase_keys(d_block, block.layouts, d)
        for a, b, call, seed in _batched_calls(plan, mine, block, branch):
            rows = slice(a.local // r + call.q_lo, a.local // r + call.q_hi)
            keys = slice(b.packed + call.k_lo, b.packed + call.k_hi)
            for i in range(q.shape[0]):
                gq, gk, gv = subproblem_attention_backward(
                    views[2][i, :, rows],
                    views[0][i, :, rows],
                    keys_v[0][i, :, keys],
                    keys_v[1][i, :, keys],
                    views[1][i, :, rows],
                    lv[i, :, :, rows],
                    scale=plan.scale,
                    is_causal=call.causal,
                    key_mask=_phase_mask(key_mask, i, b, call.k_lo, call.k_hi, phases),
                    dropout_p=plan.dropout_p,
                    dropout_seed=None if seed is None else seed + i,
                )
                views[3][i, :, rows] += gq
                grads_v[0][i, :, keys] += gk
                grads_v[1][i, :, keys] += gv
        return
    grads = _unpack(d_block, block.layouts, q.shape[-1])
    for c, ph, a, b, call, seed in _calls(plan, mine, block, branch):
        rows = a.local_slice(call.q_lo, call.q_hi)
        kp, vp = block.kv[c]
        dkp, dvp = grads[c]
        keys = slice(b.packed + call.k_lo, b.packed + call.k_hi)
        mask = None if key_mask is None else key_mask[:, b.pos_slice(call.k_lo, call.k_hi)]
        gq, gk, gv = subproblem_attention_backward(
            d_out[:, rows, ph.heads],
            q[:, rows, ph.heads],
            _kv_for_queries(kp[:, keys], ph),
            _kv_for_queries(vp[:, keys], ph),
            out[:, rows, ph.heads],
            lse[:, ph.heads, rows],
            scale=plan.scale,
            is_causal=call.causal,
            key_mask=mask,
            dropout_p=plan.dropout_p,
            dropout_seed=seed,
        )
        dq[:, rows, ph.heads] += gq
        _add_kv_grad(dkp[:, keys], gk, ph)
        _add_kv_grad(dvp[:, keys], gv, ph)


def _combined(
    plan: RingPlan, branch: SpanningBranch, held: Sequence[Held], b: int, d: int
) -> tuple[_Block, list[int]] | None:
    """The gathered blocks of a segment group as ONE block, keys in sub-problem row order.

    With contiguous shards a spanning segment's members hold consecutive rows of every phase's
    sub-problem, so their blocks side by side are one key range: each phase then needs at most
    two dense calls (keys before this rank's rows, and the causal diagonal) whatever the number
    of ranks, instead of one or more per member. Returns the block and the members in row order,
    or None when the layout does not allow it (other shardings, phases of unequal rows).
    """
    if plan.load_balance != "contiguous" or len(held) < 2:
        return None
    r = branch.r
    order = sorted(((h.src, h.block) for h in held), key=lambda item: item[0])
    layouts = [branch.layouts[src] for src, _ in order]
    first = layouts[0]
    for lay in layouts:
        if not _batchable(first, lay, plan.seq // plan.world_size, plan.heads):
            return None
        if any(len(ph.pieces) != 1 for ph in lay):
            return None
    for prev, nxt in itertools.pairwise(layouts):
        left, right = prev[0].pieces[0], nxt[0].pieces[0]
        if right.segment != left.segment or right.row != left.row + left.count:
            return None
        if left.row_step != 1:
            return None
    phases, rows = len(first), first[0].rows
    kvh = len(first[0].kv_heads)
    parts = [flat.view(b, 2, phases, rows, kvh, d) for _, flat in order]
    flat = torch.cat(parts, dim=3).reshape(b, -1)
    total = rows * len(order)
    merged = []
    for c, ph in enumerate(first):
        p0 = ph.pieces[0]
        piece = Piece(
            segment=p0.segment, count=total, local=c, local_step=r, packed=0, row=p0.row,
            row_step=1, pos=p0.pos, pos_step=p0.pos_step,
        )  # fmt: skip
        merged.append(
            PhaseLayout(ph.phase, ph.heads, ph.kv_heads, ph.kv_index, ph.uniform, total, (piece,))
        )
    return _Block(-1, tuple(merged), flat, d), [src for src, _ in order]


def _add_home(
    d_flat: torch.Tensor,
    mine: tuple[PhaseLayout, ...],
    dk: torch.Tensor,
    dv: torch.Tensor,
    heads: int,
) -> None:
    """Add this rank's packed key/value gradients into ``dk``/``dv`` ``(b, s, kv_heads, d)``."""
    dkp, dvp = (_kv_phase_view(x, mine, heads) for x in (dk, dv))
    if dkp is not None and dvp is not None:
        b, phases = dk.shape[0], len(mine)
        both = d_flat.view(b, 2, phases, mine[0].rows, len(mine[0].kv_heads), dk.shape[-1])
        dkp += both[:, 0].to(dkp.dtype)
        dvp += both[:, 1].to(dvp.dtype)
        return
    for ph, grads in zip(mine, _unpack(d_flat, mine, dk.shape[-1])):
        index = head_index(ph.kv_heads, dk.device)
        for target, grad in zip((dk, dv), grads):
            for pc in ph.pieces:
                part = grad[:, pc.packed : pc.packed + pc.count].to(target.dtype)
                rows = target[:, pc.local_slice(0, pc.count)]
                if isinstance(index, slice):
                    rows[:, :, index] += part
                else:
                    rows.index_add_(2, index, part)


@dataclass(frozen=True)
class ForwardRows:
    """This rank's query rows in the forward pass: ``q`` ``(batch, seq / P, heads, head_dim)``
    and the float32 accumulators ``acc`` (shaped like ``q``) and ``acc_lse``
    ``(batch, heads, seq / P)`` the calls merge into."""

    q: torch.Tensor
    acc: torch.Tensor
    acc_lse: torch.Tensor


@dataclass(frozen=True)
class BackwardRows:
    """This rank's rows in the backward pass: ``q``, the FINAL ``out`` and ``lse``, the output
    gradient ``d_out`` and the float32 gradients ``dq``, ``dk``, ``dv`` the calls add into."""

    q: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    d_out: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


class DenseBlockBody:
    """Dense attention of this rank's queries over the blocks of one spanning branch (a
    [`BlockBody`][dilated.ring.schedule.BlockBody]).

    Args:
        plan: the call.
        branch: the branch, on this rank.
        k, v: this rank's key/value shards ``(batch, seq / P, kv_heads, head_dim)``.
        rows: [`ForwardRows`][dilated.ring.dense_block.ForwardRows] or
            [`BackwardRows`][dilated.ring.dense_block.BackwardRows]: the pass.
        key_mask: the whole-sequence ``(batch, seq)`` key mask (True = a key that may be
            attended) or None.
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
        return _block_numel(self.branch.layouts[src], self.batch, self.head_dim)

    @cached_property
    def own(self) -> torch.Tensor:
        """This rank's packed block (packed once per pass)."""
        return _pack(self.k, self.v, self.branch.mine, self.plan.heads).reshape(-1)

    def block_for(self, dst: int) -> torch.Tensor:
        return self.own

    def _block(self, held: Held) -> _Block:
        layouts = self.branch.layouts[held.src]
        return _Block(held.src, layouts, held.block.view(self.batch, -1), self.head_dim)

    def forward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, ForwardRows)
        plan, mine, i = self.plan, self.branch.mine, self.branch.index
        combined = _combined(plan, self.branch, held, self.batch, self.head_dim)
        blocks = [combined[0]] if combined is not None else [self._block(h) for h in held]
        for block in blocks:
            _forward_block(plan, rows.q, rows.acc, rows.acc_lse, mine, block, i, self.key_mask)

    def backward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, BackwardRows)
        plan, mine, i = self.plan, self.branch.mine, self.branch.index
        tensors = (rows.q, rows.out, rows.lse, rows.d_out)
        combined = _combined(plan, self.branch, held, self.batch, self.head_dim)
        if combined is not None:
            block, members = combined
            d_all = torch.zeros(block.flat.shape, dtype=self.grad_dtype, device=rows.q.device)
            _backward_block(plan, tensors, rows.dq, mine, block, d_all, i, self.key_mask)
            b, d, phases = self.batch, self.head_dim, len(mine)
            split = d_all.view(b, 2, phases, len(members), mine[0].rows, len(mine[0].kv_heads), d)
            by_member = {m: split[:, :, :, j].reshape(-1) for j, m in enumerate(members)}
            for h in held:
                h.grad = by_member[h.src]
            return
        for h in held:
            if h.grad is None:
                h.grad = torch.zeros(h.block.shape, dtype=self.grad_dtype, device=h.block.device)
            d_block = h.grad.view(self.batch, -1)
            _backward_block(plan, tensors, rows.dq, mine, self._block(h), d_block, i, self.key_mask)

    def add_home(self, grads: Sequence[tuple[int, torch.Tensor]]) -> None:
        rows = self.rows
        assert isinstance(rows, BackwardRows)
        total = grads[0][1]
        for _, g in grads[1:]:
            total = total + g
        _add_home(total.view(self.batch, -1), self.branch.mine, rows.dk, rows.dv, self.plan.heads)
