"""Ring and all-gather dilated attention: forward and backward over ranks holding sequence shards.

Branches whose segments lie inside a run of a rank's positions are *local*: they are exactly the
single-GPU op on the shard ([`dilated.kernels.partial`][dilated.kernels.partial], the fused cuDNN
path on CUDA). For a branch whose segments span ranks, the ranks of a segment group pass the
*phase rows* of their keys and values (positions ``t = p (mod r)`` for the key/value heads the
phase's query heads read: ``1/r`` of K/V) around a ring, or all-gather them; every block received
is, for each phase, a few dense calls of the shared primitive
([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]) on strided views of
the shard and of the block ([`dilated.ring.layout`][dilated.ring.layout]), merged into float32
accumulators ([`merge_into`][dilated.core.merge.merge_into]). The next transfer is posted before
the current block is computed.

The backward pass rotates the same blocks again, each carrying the float32 gradient of its keys
and values, which every rank adds to before passing it on; after a full turn it is home. Every
call's gradient is the primitive's backward evaluated with the FINAL output and LSE, so nothing
is stored between the passes but the output and the LSE.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch

from dilated.core.branches import compute_dtype, head_index
from dilated.core.reference import derive_dropout_seed
from dilated.kernels.merge import merge_into
from dilated.kernels.partial import dilated_attention_backward, dilated_attention_forward
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.ring.comm import Transport, make_comm
from dilated.ring.layout import (
    PhaseLayout,
    Piece,
    branch_members,
    is_local,
    pair_calls,
    phase_layouts,
)

__all__ = ["RingPlan", "ring_backward", "ring_forward", "ring_passes"]


@dataclass(frozen=True)
class RingPlan:
    """Everything about one call that is not a tensor (identical on every rank).

    ``group``: the process group (or a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]);
    ``dropout_seed``: the seed of this call's dropout masks (None without dropout).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    scale: float
    is_causal: bool
    load_balance: str
    group: Any
    rank: int
    world_size: int
    seq: int
    heads: int
    kv_heads: int
    strategy: str = "ring"
    timeout_s: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None

    def local_branches(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(w_i, r_i)`` of the branches computed on the shard alone."""
        pairs = [
            (w, r)
            for w, r in zip(self.segment_lengths, self.dilation_rates)
            if is_local(self.seq, self.world_size, self.load_balance, w)
        ]
        return tuple(w for w, _ in pairs), tuple(r for _, r in pairs)

    def spanning_branches(self) -> list[tuple[int, int, int]]:
        """``(index, w, r)`` of the branches whose segments span ranks."""
        return [
            (i, w, r)
            for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates))
            if not is_local(self.seq, self.world_size, self.load_balance, w)
        ]

    def layouts(self, rank: int, w: int, r: int) -> tuple[PhaseLayout, ...]:
        return phase_layouts(
            self.seq, self.world_size, self.load_balance, rank, w, r, self.heads, self.kv_heads
        )

    def with_seed(self, seed: int) -> RingPlan:
        """This plan with the dropout seed of one call."""
        return replace(self, dropout_seed=seed)

    def seed(self, *call: int) -> int | None:
        """The dropout seed of one dense call, from this rank and the call's coordinates (the
        same in both passes, different on every rank even when all ranks drew one seed)."""
        return derive_dropout_seed(self.dropout_seed, self.rank, *call)


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


class _Ring:
    """The members of one branch's segment group around this rank."""

    def __init__(self, plan: RingPlan, w: int, comm: Transport) -> None:
        self.members = branch_members(plan.seq, plan.world_size, plan.load_balance, w, plan.rank)
        self.size = len(self.members)
        index = self.members.index(plan.rank)
        self.index = index
        self.next = comm.peer(self.members[(index + 1) % self.size])
        self.prev = comm.peer(self.members[(index - 1) % self.size])

    def source(self, step: int) -> int:
        """Group-local rank whose block this rank holds at ``step``."""
        return self.members[(self.index - step) % self.size]


def _gather(
    plan: RingPlan, comm: Transport, ring: _Ring, block: torch.Tensor, w: int, r: int, d: int
) -> list[tuple[int, torch.Tensor]]:
    """All-gather strategy: every member's packed block, this rank's own first."""
    peers = [m for m in ring.members if m != plan.rank]
    recvs = [
        ((block.shape[0], _block_numel(plan.layouts(m, w, r), 1, d)), block.dtype, comm.peer(m))
        for m in peers
    ]
    received = comm.exchange_many([(block, comm.peer(m)) for m in peers], recvs)
    return [(plan.rank, block), *zip(peers, received)]


def _combined(
    plan: RingPlan, gathered: list[tuple[int, torch.Tensor]], w: int, r: int, d: int
) -> tuple[_Block, list[int]] | None:
    """The gathered blocks of a segment group as ONE block, keys in sub-problem row order.

    With contiguous shards a spanning segment's members hold consecutive rows of every phase's
    sub-problem, so their blocks side by side are one key range: each phase then needs at most
    two dense calls (keys before this rank's rows, and the causal diagonal) whatever the number
    of ranks, instead of one or more per member. Returns the block and the members in row order,
    or None when the layout does not allow it (other shardings, phases of unequal rows).
    """
    if plan.load_balance != "contiguous" or len(gathered) < 2:
        return None
    order = sorted(gathered, key=lambda item: item[0])
    layouts = [plan.layouts(src, w, r) for src, _ in order]
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
    b, phases, rows = order[0][1].shape[0], len(first), first[0].rows
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


def _span_forward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    branch: int,
    w: int,
    r: int,
    comm: Transport,
    key_mask: torch.Tensor | None,
) -> None:
    d = q.shape[-1]
    mine = plan.layouts(plan.rank, w, r)
    ring = _Ring(plan, w, comm)
    own = _pack(k, v, mine, plan.heads)

    def compute(src: int, flat: torch.Tensor) -> None:
        layouts = plan.layouts(src, w, r)
        block = _Block(src, layouts, flat, d)
        _forward_block(plan, q, acc, acc_lse, mine, block, branch, key_mask)

    if plan.strategy == "allgather":
        gathered = _gather(plan, comm, ring, own, w, r, d)
        combined = _combined(plan, gathered, w, r, d)
        if combined is not None:
            _forward_block(plan, q, acc, acc_lse, mine, combined[0], branch, key_mask)
        else:
            for src, flat in gathered:
                compute(src, flat)
        for _, flat in gathered[1:]:
            comm.release(flat)
        return
    flat = own
    for step in range(ring.size):
        pending = None
        if step + 1 < ring.size:
            nxt = plan.layouts(ring.source(step + 1), w, r)
            pending = comm.exchange(
                flat, ring.next, ring.prev, (q.shape[0], _block_numel(nxt, 1, d))
            )
        compute(ring.source(step), flat)
        if pending is not None:
            received = pending.wait()
            if flat is not own:
                comm.release(flat)
            flat = received
    if flat is not own:
        comm.release(flat)


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


def _span_backward(
    plan: RingPlan,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    branch: int,
    w: int,
    r: int,
    comm: Transport,
    key_mask: torch.Tensor | None,
) -> None:
    q = tensors[0]
    dq, dk, dv = grads
    d = q.shape[-1]
    mine = plan.layouts(plan.rank, w, r)
    ring = _Ring(plan, w, comm)
    own = _pack(k, v, mine, plan.heads)
    # Key/value gradients travel and accumulate in float32 (float64 for float64 inputs).
    work = dq.dtype

    def compute(src: int, flat: torch.Tensor, d_flat: torch.Tensor) -> None:
        layouts = plan.layouts(src, w, r)
        block = _Block(src, layouts, flat, d)
        _backward_block(plan, tensors, dq, mine, block, d_flat, branch, key_mask)

    if plan.strategy == "allgather":
        gathered = _gather(plan, comm, ring, own, w, r, d)
        combined = _combined(plan, gathered, w, r, d)
        if combined is not None:
            block, members = combined
            d_all = torch.zeros(block.flat.shape, dtype=work, device=q.device)
            _backward_block(plan, tensors, dq, mine, block, d_all, branch, key_mask)
            b, phases = q.shape[0], len(mine)
            rows, kvh = mine[0].rows, len(mine[0].kv_heads)
            split = d_all.view(b, 2, phases, len(members), rows, kvh, d)
            by_member = {m: split[:, :, :, i].reshape(b, -1) for i, m in enumerate(members)}
            d_flats = [by_member[src] for src, _ in gathered]
        else:
            d_flats = [torch.zeros(f.shape, dtype=work, device=q.device) for _, f in gathered]
            for (src, flat), d_flat in zip(gathered, d_flats):
                compute(src, flat, d_flat)
        # Reduce-scatter: each peer's key gradients go back to it; ours come from every peer.
        peers = [comm.peer(src) for src, _ in gathered[1:]]
        returned = comm.exchange_many(
            list(zip(d_flats[1:], peers)), [(own.shape, work, p) for p in peers]
        )
        for t in returned:
            d_flats[0] += t
            comm.release(t)
        for _, flat in gathered[1:]:
            comm.release(flat)
        _add_home(d_flats[0], mine, dk, dv, plan.heads)
        return
    flat = own
    d_flat = torch.zeros(own.shape, dtype=work, device=q.device)
    d_owned = True
    for step in range(ring.size):
        src = ring.source(step)
        pending = None
        if step + 1 < ring.size:
            nxt = plan.layouts(ring.source(step + 1), w, r)
            pending = comm.exchange(
                flat, ring.next, ring.prev, (q.shape[0], _block_numel(nxt, 1, d))
            )
        compute(src, flat, d_flat)
        # The gradient of the block moves on with it (after a full turn it is home).
        if ring.size > 1:
            home = plan.layouts(ring.source(step + 1), w, r)
            received_d = comm.exchange(
                d_flat, ring.next, ring.prev, (q.shape[0], _block_numel(home, 1, d))
            ).wait()
            if not d_owned:
                comm.release(d_flat)
            d_flat, d_owned = received_d, False
        if pending is not None:
            received = pending.wait()
            if flat is not own:
                comm.release(flat)
            flat = received
    if flat is not own:
        comm.release(flat)
    _add_home(d_flat, mine, dk, dv, plan.heads)
    if not d_owned:
        comm.release(d_flat)


def ring_forward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: Transport,
    key_mask: torch.Tensor | None = None,
    key_mask_shard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of this rank's queries over every branch, outside autograd.

    Args:
        plan: the call.
        q, k, v: this rank's shards ``(batch, seq / P, heads | kv_heads, head_dim)``.
        comm: the transport of ``plan.group``.
        key_mask: the whole-sequence ``(batch, seq)`` key mask in the internal form (True = a key that may be attended) or None.
        key_mask_shard: this rank's ``(batch, seq / P)`` rows of it.

    Returns:
        ``out`` ``(batch, seq / P, heads, head_dim)`` in q's dtype and ``lse``
        ``(batch, heads, seq / P)`` float32 (float64 for float64 inputs).
    """
    local_ws, local_rs = plan.local_branches()
    spanning = plan.spanning_branches()
    options = {
        "scale": plan.scale,
        "is_causal": plan.is_causal,
        "key_padding_mask": key_mask_shard,
        "dropout_p": plan.dropout_p,
        "dropout_seed": plan.seed(-1),
    }
    local = None
    if local_ws:
        local = dilated_attention_forward(q, k, v, local_ws, local_rs, **options)  # type: ignore[arg-type]
        if not spanning:
            return local
    work = compute_dtype(q.dtype)
    b, s, h, d = q.shape
    if local is not None:
        # The local result starts the float32 accumulators (one pass, no zero-fill).
        acc = local[0].to(work, copy=True)
        acc_lse = local[1].to(work, copy=True)
    else:
        acc = torch.zeros(b, s, h, d, dtype=work, device=q.device)
        acc_lse = torch.full((b, h, s), float("-inf"), dtype=work, device=q.device)
    for branch, w, r in spanning:
        _span_forward(plan, q, k, v, acc, acc_lse, branch, w, r, comm, key_mask)
    return acc.to(q.dtype), acc_lse


def ring_backward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    comm: Transport,
    key_mask: torch.Tensor | None = None,
    key_mask_shard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shards given the final ``out``/``lse`` of
    [`ring_forward`][dilated.ring.ring.ring_forward] (outside autograd; every rank calls it).

    Returns gradients in the dtypes of ``q``, ``k``, ``v``.
    """
    local_ws, local_rs = plan.local_branches()
    spanning = plan.spanning_branches()
    d_out = d_out.to(q.dtype)
    local = None
    if local_ws:
        local = dilated_attention_backward(
            d_out, q, k, v, out, lse, local_ws, local_rs, scale=plan.scale,
            is_causal=plan.is_causal, key_padding_mask=key_mask_shard,
            dropout_p=plan.dropout_p, dropout_seed=plan.seed(-1),
        )  # fmt: skip
        if not spanning:
            return local[0].to(q.dtype), local[1].to(k.dtype), local[2].to(v.dtype)
    work = compute_dtype(q.dtype)
    if local is not None:
        grads = tuple(part.to(work, copy=True) for part in local)
    else:
        grads = tuple(torch.zeros(x.shape, dtype=work, device=q.device) for x in (q, k, v))
    for branch, w, r in spanning:
        _span_backward(plan, (q, out, lse, d_out), k, v, grads, branch, w, r, comm, key_mask)  # type: ignore[arg-type]
    dq, dk, dv = grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def ring_passes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: Any = None,
    is_causal: bool = False,
    load_balance: str = "contiguous",
    strategy: str = "ring",
    scale: float | None = None,
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's forward and backward passes without autograd: ``(out, dq, dk, dv)``.

    For rings of [`dilated.ring.loopback`][dilated.ring.loopback] threads on CUDA, where autograd
    runs every backward of a device on one engine thread, so the ranks' backward passes would
    wait for each other there. Inputs as in
    [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention] (not validated);
    ``d_out`` is the gradient of this rank's output rows.
    """
    comm = make_comm(group, timeout_s)
    plan = RingPlan(
        segment_lengths=tuple(segment_lengths),
        dilation_rates=tuple(dilation_rates),
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        is_causal=is_causal,
        load_balance=load_balance,
        group=group,
        rank=comm.rank,
        world_size=comm.world_size,
        seq=q.shape[1] * comm.world_size,
        heads=q.shape[2],
        kv_heads=k.shape[2],
        strategy=strategy,
        timeout_s=timeout_s,
    )
    out, lse = ring_forward(plan, q, k, v, comm)
    return (out, *ring_backward(plan, q, k, v, out, lse, d_out, comm))
