"""Ring dilated attention: forward and backward over ranks that each hold a shard of the sequence.

For each branch ``(w, r)`` a rank needs the keys of the segments its queries lie in. A branch
whose segments fit inside the runs of positions a rank holds is computed locally. For a branch
whose segments span ranks, the ranks of a segment group form a ring and the *phase rows* of their
keys and values (positions ``t`` with ``t mod r == p`` for the key/value heads read by the query
heads of phase ``p``: ``1/r`` of K/V) rotate around it; each rank merges the block results into
its running output by log-sum-exp (:func:`dilated.core.merge.merge_attention`). The next transfer
is posted before the current block is computed.

The backward pass is a ring too: the same blocks rotate again, each carrying the gradient of its
keys and values, which every rank adds to before passing it on; after a full turn the gradient
arrives back at the block's owner. It uses the final log-sum-exp ``L`` and ``D = rowsum(dO * O)``,
so no per-block state is stored between the passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dilated.core.merge import merge_attention
from dilated.core.reference import compute_dtype
from dilated.ring.comm import RingComm
from dilated.ring.local import block_attention, block_grads, pair_mask
from dilated.ring.sharding import chunk_length, positions

__all__ = ["RingPlan", "ring_attention_forward", "ring_dilated_attention_function"]


@dataclass(frozen=True)
class RingPlan:
    """Everything about one call that is not a tensor (identical on every rank)."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    scale: float
    is_causal: bool
    load_balance: str
    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    seq: int
    heads: int
    kv_heads: int
    strategy: str = "ring"
    timeout_s: float | None = None

    def branch_group(self, w: int) -> list[int]:
        """Ranks (group-local numbers) whose keys this rank's queries may see in a branch."""
        if chunk_length(self.seq, self.world_size, self.load_balance) % w == 0:
            return [self.rank]
        if self.load_balance == "contiguous" and w < self.seq:
            size = w // (self.seq // self.world_size)
            first = (self.rank // size) * size
            return list(range(first, min(first + size, self.world_size)))
        return list(range(self.world_size))

    def local_rows(self, w: int, r: int) -> int:
        """Phase rows per segment when the branch is local (segments inside chunks), else 0."""
        local = chunk_length(self.seq, self.world_size, self.load_balance) % w == 0
        return w // r if local else 0

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


@dataclass
class _Phase:
    """Rows and heads of one phase of one branch on one rank."""

    rows: torch.Tensor  # row indices into the shard
    pos: torch.Tensor  # their global positions
    q_heads: torch.Tensor  # query heads of the phase
    kv_heads: torch.Tensor  # distinct key/value heads they read
    kv_index: torch.Tensor  # for each query head, its kv head's index in kv_heads


def _phases(plan: RingPlan, rank: int, r: int, device: torch.device) -> list[_Phase]:
    pos = positions(plan.seq, rank, plan.world_size, plan.load_balance, device=device)
    group = plan.heads // plan.kv_heads
    out = []
    for p in range(min(r, plan.heads)):
        rows = torch.nonzero(pos % r == p).flatten()
        q_heads = torch.arange(p, plan.heads, r, device=device)
        kv_of_q = q_heads // group
        kv_heads = torch.unique(kv_of_q)
        out.append(
            _Phase(rows, pos[rows], q_heads, kv_heads, torch.searchsorted(kv_heads, kv_of_q))
        )
    return out


def _payload_numel(phases: list[_Phase], batch: int, head_dim: int) -> int:
    return 2 * sum(batch * len(ph.rows) * len(ph.kv_heads) * head_dim for ph in phases)


def _pack(k: torch.Tensor, v: torch.Tensor, phases: list[_Phase]) -> torch.Tensor:
    """Flat ``(batch, F)`` block of the phase rows of k and v (all phases, k then v)."""
    parts = [
        x[:, ph.rows[:, None], ph.kv_heads[None, :]].flatten(1) for x in (k, v) for ph in phases
    ]
    return torch.cat(parts, dim=1)


def _unpack(
    block: torch.Tensor, phases: list[_Phase], head_dim: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views ``(k_p, v_p)`` ``(batch, rows_p, kv_heads_p, head_dim)`` of a packed block."""
    b = block.shape[0]
    sizes = [len(ph.rows) * len(ph.kv_heads) * head_dim for ph in phases]
    views = torch.split(block, sizes + sizes, dim=1)
    shaped = [
        t.view(b, len(ph.rows), len(ph.kv_heads), head_dim) for t, ph in zip(views, phases + phases)
    ]
    n = len(phases)
    return list(zip(shaped[:n], shaped[n:]))


class _Ring:
    """The rotation of blocks around one branch's group of ranks."""

    def __init__(self, plan: RingPlan, members: list[int], comm: RingComm) -> None:
        self.plan = plan
        self.members = members
        self.size = len(members)
        self.index = members.index(plan.rank)
        self.comm = comm
        self.next = plan.global_rank(members[(self.index + 1) % self.size])
        self.prev = plan.global_rank(members[(self.index - 1) % self.size])

    def source(self, step: int) -> int:
        """Group-local rank whose block this rank holds at ``step``."""
        return self.members[(self.index - step) % self.size]


def _fold(x: torch.Tensor, length: int) -> torch.Tensor:
    """``(b, n, h, d)`` rows of whole segments -> ``(b * n / length, length, h, d)``."""
    return x.reshape(-1, length, *x.shape[2:])


def _fold_lse(x: torch.Tensor, length: int) -> torch.Tensor:
    """``(b, h, n)`` -> ``(b * n / length, h, length)``, matching :func:`_fold`."""
    b, h, n = x.shape
    return x.reshape(b, h, n // length, length).permute(0, 2, 1, 3).reshape(-1, h, length)


def _unfold_lse(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_fold_lse`."""
    _, h, length = x.shape
    return x.reshape(batch, -1, h, length).permute(0, 2, 1, 3).reshape(batch, h, -1)


def _with_keys(
    mask: torch.Tensor, key_mask: torch.Tensor | None, theirs: _Phase, fold: int = 0
) -> torch.Tensor:
    """``mask`` ``(nq, nk)`` and the key padding of the block's keys: ``(batch', 1, nq, nk)``.

    ``key_mask`` is the whole ``(batch, seq)`` mask, indexed by the keys' global positions;
    with ``fold`` the batch is folded into segments like the keys (:func:`_fold`).
    """
    if key_mask is None:
        return mask
    keys = key_mask[:, theirs.pos]
    if fold:
        keys = _fold(keys, fold)
    return mask & keys[:, None, None, :]


def _forward_block(
    plan: RingPlan,
    q: torch.Tensor,
    block: torch.Tensor,
    mine: list[_Phase],
    theirs: list[_Phase],
    w: int,
    outs: list[torch.Tensor | None],
    lses: list[torch.Tensor | None],
    fold: int = 0,
    key_mask: torch.Tensor | None = None,
) -> None:
    """Merge the attention of this rank's phase rows over one packed block into ``outs/lses``.

    ``key_mask``: the whole ``(batch, seq)`` key padding mask (True = real token) or None.
    """
    d = q.shape[-1]
    for i, (ph, (kp, vp), th) in enumerate(zip(mine, _unpack(block, theirs, d), theirs)):
        if len(ph.rows) == 0 or len(th.rows) == 0:
            continue
        qp = q[:, ph.rows[:, None], ph.q_heads[None, :]]
        kq = kp.index_select(2, ph.kv_index).to(q.dtype)
        vq = vp.index_select(2, ph.kv_index).to(q.dtype)
        if fold:
            # A local branch: its segments are independent problems of `fold` rows each,
            # batched instead of masked out of one shard-wide score matrix.
            mask = _with_keys(
                pair_mask(ph.pos[:fold], ph.pos[:fold], w, plan.is_causal), key_mask, th, fold
            )
            o, lse = block_attention(
                _fold(qp, fold), _fold(kq, fold), _fold(vq, fold), mask, plan.scale
            )
            o, lse = o.reshape(qp.shape), _unfold_lse(lse, qp.shape[0])
        else:
            mask = _with_keys(pair_mask(ph.pos, th.pos, w, plan.is_causal), key_mask, th)
            if not bool(mask.any()):
                continue  # e.g. a block wholly in the causal future
            o, lse = block_attention(qp, kq, vq, mask, plan.scale)
        prev_o, prev_l = outs[i], lses[i]
        if prev_o is None or prev_l is None:
            outs[i], lses[i] = o, lse
        else:
            outs[i], lses[i] = merge_attention([prev_o, o], [prev_l, lse])


def _backward_block(
    plan: RingPlan,
    q: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
    block: torch.Tensor,
    d_block: torch.Tensor,
    mine: list[_Phase],
    theirs: list[_Phase],
    w: int,
    fold: int = 0,
    key_mask: torch.Tensor | None = None,
) -> None:
    """Add one block's gradients: into ``dq`` for this rank's rows, into ``d_block`` for its keys."""
    d = q.shape[-1]
    kv_views = _unpack(block, theirs, d)
    d_views = _unpack(d_block, theirs, d)
    for ph, (kp, vp), (dkp, dvp), th in zip(mine, kv_views, d_views, theirs):
        if len(ph.rows) == 0 or len(th.rows) == 0:
            continue
        sel = (slice(None), ph.rows[:, None], ph.q_heads[None, :])
        lsel = (slice(None), ph.q_heads[:, None], ph.rows[None, :])
        qp = q[sel]
        kq = kp.index_select(2, ph.kv_index).to(q.dtype)
        vq = vp.index_select(2, ph.kv_index).to(q.dtype)
        if fold:
            mask = _with_keys(
                pair_mask(ph.pos[:fold], ph.pos[:fold], w, plan.is_causal), key_mask, th, fold
            )
            gq, gk, gv = block_grads(
                _fold(qp, fold),
                _fold(kq, fold),
                _fold(vq, fold),
                mask,
                plan.scale,
                _fold_lse(lse[lsel], fold),
                _fold(d_out[sel], fold),
                _fold_lse(delta[lsel], fold),
            )
            gq, gk, gv = gq.reshape(qp.shape), gk.reshape(kq.shape), gv.reshape(vq.shape)
        else:
            mask = _with_keys(pair_mask(ph.pos, th.pos, w, plan.is_causal), key_mask, th)
            if not bool(mask.any()):
                continue
            gq, gk, gv = block_grads(
                qp, kq, vq, mask, plan.scale, lse[lsel], d_out[sel], delta[lsel]
            )
        dq[sel] += gq
        # Query heads that share a kv head (grouped-query attention) add into it.
        dkp.index_add_(2, ph.kv_index, gk)
        dvp.index_add_(2, ph.kv_index, gv)


def _gather_blocks(
    plan: RingPlan, ring: _Ring, block: torch.Tensor, r: int, head_dim: int
) -> list[tuple[int, torch.Tensor]]:
    """All-gather strategy: every group member's packed block, this rank's own first."""
    b, device = block.shape[0], block.device
    peers = [m for m in ring.members if m != plan.rank]
    recvs = [
        (
            (b, _payload_numel(_phases(plan, m, r, device), 1, head_dim)),
            block.dtype,
            plan.global_rank(m),
        )
        for m in peers
    ]
    received = ring.comm.exchange_many([(block, plan.global_rank(m)) for m in peers], recvs)
    return [(plan.rank, block), *zip(peers, received)]


def _forward_branch(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: int,
    r: int,
    comm: RingComm,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = q.shape[0], q.shape[-1]
    device = q.device
    mine = _phases(plan, plan.rank, r, device)
    ring = _Ring(plan, plan.branch_group(w), comm)
    outs: list[torch.Tensor | None] = [None] * len(mine)
    lses: list[torch.Tensor | None] = [None] * len(mine)
    block = _pack(k, v, mine)
    if plan.strategy == "allgather":
        gathered = _gather_blocks(plan, ring, block, r, d)
        for src, blk in gathered:
            theirs = mine if src == plan.rank else _phases(plan, src, r, device)
            _forward_block(
                plan, q, blk, mine, theirs, w, outs, lses, plan.local_rows(w, r), key_mask
            )
        for _, blk in gathered[1:]:
            comm.release(blk)
        return _scatter_phases(q, mine, outs, lses)
    owned = True  # the block in hand is this rank's own (not a pool buffer)
    for step in range(ring.size):
        src = ring.source(step)
        theirs = mine if src == plan.rank else _phases(plan, src, r, device)
        pending = None
        if step + 1 < ring.size:
            nxt = _phases(plan, ring.source(step + 1), r, device)
            pending = comm.exchange(block, ring.next, ring.prev, (b, _payload_numel(nxt, 1, d)))
        _forward_block(plan, q, block, mine, theirs, w, outs, lses, plan.local_rows(w, r), key_mask)
        if pending is not None:
            received = pending.wait()
            assert received is not None
            if not owned:
                comm.release(block)
            block, owned = received, False
    if not owned:
        comm.release(block)
    return _scatter_phases(q, mine, outs, lses)


def _scatter_phases(
    q: torch.Tensor,
    mine: list[_Phase],
    outs: list[torch.Tensor | None],
    lses: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ``(b, s, h, d)`` output and ``(b, h, s)`` lse of one branch from its phases."""
    b, s, hq, _ = q.shape
    out = torch.zeros_like(q)
    lse_full = torch.full((b, hq, s), float("-inf"), dtype=q.dtype, device=q.device)
    for ph, o_p, l_p in zip(mine, outs, lses):
        if o_p is None or l_p is None:
            continue
        out[:, ph.rows[:, None], ph.q_heads[None, :]] = o_p
        lse_full[:, ph.q_heads[:, None], ph.rows[None, :]] = l_p
    return out, lse_full


def _backward_branch(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    delta: torch.Tensor,
    w: int,
    r: int,
    comm: RingComm,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor | None = None,
) -> None:
    dq, dk, dv = grads
    b, d = q.shape[0], q.shape[-1]
    device = q.device
    mine = _phases(plan, plan.rank, r, device)
    ring = _Ring(plan, plan.branch_group(w), comm)
    block = _pack(k, v, mine)
    # Blocks travel in the input dtype; their gradients accumulate in the compute dtype.
    d_block = torch.zeros(block.shape, dtype=q.dtype, device=q.device)
    if plan.strategy == "allgather":
        gathered = _gather_blocks(plan, ring, block, r, d)
        d_blocks = [torch.zeros(blk.shape, dtype=q.dtype, device=q.device) for _, blk in gathered]
        for (src, blk), d_blk in zip(gathered, d_blocks):
            theirs = mine if src == plan.rank else _phases(plan, src, r, device)
            _backward_block(
                plan,
                q,
                lse,
                d_out,
                delta,
                dq,
                blk,
                d_blk,
                mine,
                theirs,
                w,
                plan.local_rows(w, r),
                key_mask,
            )
        # Reduce-scatter: each peer's key gradients go back to it; ours come from every peer.
        peers = [plan.global_rank(src) for src, _ in gathered[1:]]
        returned = comm.exchange_many(
            list(zip(d_blocks[1:], peers)), [(block.shape, q.dtype, p) for p in peers]
        )
        d_own = d_blocks[0]
        for t in returned:
            d_own += t
            comm.release(t)
        for _, blk in gathered[1:]:
            comm.release(blk)
        _add_home(d_own, mine, dk, dv)
        return
    owned = d_owned = True
    for step in range(ring.size):
        src = ring.source(step)
        theirs = mine if src == plan.rank else _phases(plan, src, r, device)
        pending = None
        if step + 1 < ring.size:
            nxt = _phases(plan, ring.source(step + 1), r, device)
            pending = comm.exchange(block, ring.next, ring.prev, (b, _payload_numel(nxt, 1, d)))
        _backward_block(
            plan,
            q,
            lse,
            d_out,
            delta,
            dq,
            block,
            d_block,
            mine,
            theirs,
            w,
            plan.local_rows(w, r),
            key_mask,
        )
        # The gradient of the block moves on with it (after a full turn it is home).
        if ring.size > 1:
            home = _phases(plan, ring.source(step + 1), r, device)
            d_pending = comm.exchange(
                d_block, ring.next, ring.prev, (b, _payload_numel(home, 1, d))
            )
            d_received = d_pending.wait()
            assert d_received is not None
            if not d_owned:
                comm.release(d_block)
            d_block, d_owned = d_received, False
        if pending is not None:
            received = pending.wait()
            assert received is not None
            if not owned:
                comm.release(block)
            block, owned = received, False
    if not owned:
        comm.release(block)
    _add_home(d_block, mine, dk, dv)
    if not d_owned:
        comm.release(d_block)


def _add_home(
    d_block: torch.Tensor, mine: list[_Phase], dk: torch.Tensor, dv: torch.Tensor
) -> None:
    """Add this rank's packed key/value gradients into ``dk``/``dv`` ``(b, s, h_kv, d)``."""
    for ph, (dkp, dvp) in zip(mine, _unpack(d_block, mine, dk.shape[-1])):
        dk[:, ph.rows[:, None], ph.kv_heads[None, :]] += dkp
        dv[:, ph.rows[:, None], ph.kv_heads[None, :]] += dvp


def ring_attention_forward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: RingComm,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and lse (compute dtype) of this rank's queries over all branches, no autograd.

    ``key_mask``: the whole-sequence ``(batch, seq)`` key padding mask (True = real) or None.
    """
    outs, lses = [], []
    for w, r in zip(plan.segment_lengths, plan.dilation_rates):
        o, lse = _forward_branch(plan, q, k, v, w, r, comm, key_mask)
        outs.append(o)
        lses.append(lse)
    return merge_attention(outs, lses)


class _RingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: RingPlan,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(q.dtype)
        qc = q.to(dtype)
        comm = RingComm(plan.group, plan.timeout_s)
        out, lse = ring_attention_forward(plan, qc, k, v, comm, key_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.key_mask = key_mask  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor, _d_lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        key_mask: torch.Tensor | None = ctx.key_mask  # type: ignore[attr-defined]
        plan: RingPlan = ctx.plan  # type: ignore[attr-defined]
        dtype = out.dtype
        qc, doc = q.to(dtype), d_out.to(dtype)
        delta = (doc * out).sum(-1).transpose(1, 2)  # (b, h, s)
        grads = (
            torch.zeros_like(qc),
            torch.zeros(k.shape, dtype=dtype, device=k.device),
            torch.zeros(v.shape, dtype=dtype, device=v.device),
        )
        comm = RingComm(plan.group, plan.timeout_s)
        for w, r in zip(plan.segment_lengths, plan.dilation_rates):
            _backward_branch(plan, qc, k, v, lse, doc, delta, w, r, comm, grads, key_mask)
        dq, dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_dilated_attention_function(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: RingPlan,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ring attention of validated shards: ``(out, lse)`` (lse not differentiable).

    ``key_mask``: the whole-sequence ``(batch, seq)`` key padding mask (True = real) or None.
    """
    out, lse = _RingDilatedAttention.apply(q, k, v, plan, key_mask)
    return out, lse
