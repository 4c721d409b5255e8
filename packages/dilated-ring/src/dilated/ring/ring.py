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

from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.core.merge import merge_into
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

__all__ = ["RingPlan", "ring_backward", "ring_dilated_attention_function", "ring_forward"]


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

    def seed(self, *call: int) -> int | None:
        """The dropout seed of one dense call, from its coordinates (same in both passes)."""
        if self.dropout_seed is None:
            return None
        h = self.dropout_seed
        for x in call:
            h = (h * 1_000_003 + x + 1) % (1 << 62)
        return h


def _block_numel(layouts: tuple[PhaseLayout, ...], batch: int, head_dim: int) -> int:
    return 2 * sum(batch * ph.rows * len(ph.kv_heads) * head_dim for ph in layouts)


def _select_heads(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    if list(heads) == list(range(heads[0], heads[-1] + 1)):
        return x[:, :, heads[0] : heads[-1] + 1]
    return x.index_select(2, torch.tensor(heads, device=x.device))


def _pack(k: torch.Tensor, v: torch.Tensor, layouts: tuple[PhaseLayout, ...]) -> torch.Tensor:
    """Flat ``(batch, F)`` block of the phase rows of k and v (every phase's k, then its v)."""
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
    return x.index_select(2, torch.tensor(ph.kv_index, device=x.device))


def _add_kv_grad(target: torch.Tensor, grad: torch.Tensor, ph: PhaseLayout) -> None:
    if ph.uniform:
        target += grad
    else:
        index = torch.tensor(ph.kv_index, device=target.device)
        target.index_add_(2, index, grad.to(target.dtype))


@dataclass
class _Block:
    """A block in hand: its owner's layouts and views of its packed k/v (and their gradients)."""

    src: int
    layouts: tuple[PhaseLayout, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


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
    grads: list[tuple[torch.Tensor, torch.Tensor]],
    branch: int,
    key_mask: torch.Tensor | None,
) -> None:
    q, out, lse, d_out = tensors
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
    own = _pack(k, v, mine)

    def compute(src: int, flat: torch.Tensor) -> None:
        layouts = plan.layouts(src, w, r)
        block = _Block(src, layouts, _unpack(flat, layouts, d))
        _forward_block(plan, q, acc, acc_lse, mine, block, branch, key_mask)

    if plan.strategy == "allgather":
        gathered = _gather(plan, comm, ring, own, w, r, d)
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
    d_flat: torch.Tensor, mine: tuple[PhaseLayout, ...], dk: torch.Tensor, dv: torch.Tensor
) -> None:
    """Add this rank's packed key/value gradients into ``dk``/``dv`` ``(b, s, kv_heads, d)``."""
    for ph, grads in zip(mine, _unpack(d_flat, mine, dk.shape[-1])):
        heads = torch.tensor(ph.kv_heads, device=dk.device)
        for target, grad in zip((dk, dv), grads):
            for pc in ph.pieces:
                part = grad[:, pc.packed : pc.packed + pc.count].to(target.dtype)
                target[:, pc.local_slice(0, pc.count)].index_add_(2, heads, part)


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
    own = _pack(k, v, mine)
    # Key/value gradients travel and accumulate in float32 (float64 for float64 inputs).
    work = dq.dtype

    def compute(src: int, flat: torch.Tensor, d_flat: torch.Tensor) -> None:
        layouts = plan.layouts(src, w, r)
        block = _Block(src, layouts, _unpack(flat, layouts, d))
        _backward_block(
            plan, tensors, dq, mine, block, _unpack(d_flat, layouts, d), branch, key_mask
        )

    if plan.strategy == "allgather":
        gathered = _gather(plan, comm, ring, own, w, r, d)
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
        _add_home(d_flats[0], mine, dk, dv)
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
    _add_home(d_flat, mine, dk, dv)
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
        key_mask: the whole-sequence ``(batch, seq)`` key padding mask (True = real) or None.
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
    acc = torch.zeros(b, s, h, d, dtype=work, device=q.device)
    acc_lse = torch.full((b, h, s), float("-inf"), dtype=work, device=q.device)
    if local is not None:
        acc.copy_(local[0])
        acc_lse.copy_(local[1])
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
    grads = tuple(torch.zeros(x.shape, dtype=work, device=q.device) for x in (q, k, v))
    if local is not None:
        for total, part in zip(grads, local):
            total += part
    for branch, w, r in spanning:
        _span_backward(plan, (q, out, lse, d_out), k, v, grads, branch, w, r, comm, key_mask)  # type: ignore[arg-type]
    dq, dk, dv = grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: RingPlan,
        key_mask: torch.Tensor | None,
        key_mask_shard: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        comm = make_comm(plan.group, plan.timeout_s)
        out, lse = ring_forward(plan, q, k, v, comm, key_mask, key_mask_shard)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.masks = (key_mask, key_mask_shard)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, d_out: torch.Tensor, _d_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        plan: RingPlan = ctx.plan
        comm = make_comm(plan.group, plan.timeout_s)
        grads = ring_backward(plan, q, k, v, out, lse, d_out, comm, *ctx.masks)
        return (*grads, None, None, None)


def ring_dilated_attention_function(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: RingPlan,
    key_mask: torch.Tensor | None = None,
    key_mask_shard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ring attention of validated shards: ``(out, lse)`` (lse not differentiable).

    ``key_mask``: the whole-sequence ``(batch, seq)`` key padding mask (True = real) or None;
    ``key_mask_shard``: this rank's rows of it.
    """
    out, lse = _RingDilatedAttention.apply(q, k, v, plan, key_mask, key_mask_shard)
    return out, lse
