"""Block-sparse dilated attention over a sequence split into contiguous shards across ranks.

A branch whose segments lie inside a shard (``w`` divides the shard length ``S``) is *local*:
the single-process engine on the shard, no transfer. A branch whose segment spans ranks
(``S`` divides ``w``, or the whole sequence for ``w >= seq``) is *spanning*: a rank's queries of
it are whole blocks ``[a0, a0 + S / (r B))`` of one segment (``S`` a multiple of ``r B``), the
layout says which key blocks they need, and each rank receives exactly those rows of K/V (the
phase's rows of the key/value heads the phase's query heads read) from their owners, in one
[`exchange_many`][dilated.ring.transport.Transport.exchange_many] per branch. Blocks outside the
layout are neither sent nor computed. Every rank derives every other rank's needs from the
layout, so no metadata travels. The tiles of the rank's rows then run against the gathered keys
([`forward_into`][dilated.sparse.engine.forward_into], the queries shifted to the shard), and in
the backward pass the key/value gradients of the received rows go back to their owners (float32).

[`comm_bytes`][dilated.sparse.distributed.comm_bytes] is the cost model of those transfers; the
tests compare it with the bytes the transport counts.

The gathered keys are held in a buffer of one segment (``min(w, seq)`` rows), as LongNet's
all-gather holds them; only the needed rows are filled.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.core.config import SparsePatternConfig
from dilated.core.reference import derive_dropout_seed, draw_dropout_seed, dropout_seed_value
from dilated.core.sparsity import BranchLayout
from dilated.ring.comm import Transport, gather_key_padding_mask, make_comm
from dilated.ring.functional import as_process_group, group_rank_and_size
from dilated.ring.validation import CheckedCall, check_call
from dilated.sparse.engine import (
    RunTable,
    _branch_runs,
    _run_tables,
    backward_into,
    forward_into,
    uninitialized_accumulators,
)
from dilated.sparse.functional import ResolvedLayouts, resolve, sparse_op

__all__ = ["block_sparse_ring_dilated_attention", "check_sharding", "comm_bytes"]


@dataclass(frozen=True)
class _Shards:
    """The sharding of one call: ``world`` contiguous shards of ``shard`` positions each."""

    seq: int
    shard: int
    world: int
    heads: int
    kv_heads: int
    block: int
    causal: bool


def check_sharding(
    layouts: Sequence[BranchLayout], shard: int, world: int, block_size: int
) -> list[bool]:
    """Which branches span ranks; ``ValueError`` naming the branch when one cannot be sharded.

    A branch is local when ``w`` divides the shard length ``S``; it spans ranks when its
    segment (``min(w, seq)``) is a multiple of ``S`` and ``S`` a multiple of ``r * block_size``
    (each rank's rows of it are then whole blocks).
    """
    seq = shard * world
    spanning = []
    for i, lay in enumerate(layouts):
        w, r = lay.segment_length, lay.dilation_rate
        if shard % w == 0:
            spanning.append(False)
            continue
        segment = min(w, seq)
        if segment % shard or shard % (r * block_size):
            raise ValueError(
                f"segment_lengths[{i}]={w} (dilation rate {r}) cannot be split over {world} "
                f"contiguous shards of {shard} positions: w must divide the shard length, or "
                f"min(w, seq) be a multiple of it with the shard a multiple of "
                f"rate * block_size = {r * block_size}"
            )
        spanning.append(True)
    return spanning


def _segment(sh: _Shards, w: int, rank: int) -> tuple[int, int]:
    """``(first position, length)`` of the segment of branch ``w`` holding ``rank``'s shard."""
    length = min(w, sh.seq)
    return (rank * sh.shard) // length * length, length


def _query_table(sh: _Shards, lay: BranchLayout, rank: int) -> tuple[torch.Tensor, int]:
    """The branch's table with only ``rank``'s query blocks kept, and its first block."""
    start, _ = _segment(sh, lay.segment_length, rank)
    r = lay.dilation_rate
    a0 = (rank * sh.shard - start) // r // sh.block
    count = sh.shard // r // sh.block
    table = torch.zeros_like(lay.blocks)
    table[a0 : a0 + count] = lay.blocks[a0 : a0 + count]
    if sh.causal:
        table &= torch.ones_like(table).tril()
    return table, a0


def _phase_kv_heads(sh: _Shards, r: int, p: int) -> tuple[int, ...]:
    group = sh.heads // sh.kv_heads
    return tuple(sorted({j // group for j in range(p, sh.heads, r)}))


#: Rows one rank sends another for one branch: per phase, global positions and key/value heads.
_Transfer = tuple[tuple[torch.Tensor, tuple[int, ...]], ...]


def _transfer(sh: _Shards, lay: BranchLayout, dst: int, src: int) -> _Transfer:
    """The rows of ``src``'s shard that ``dst``'s queries need in a spanning branch."""
    start, length = _segment(sh, lay.segment_length, dst)
    r, b = lay.dilation_rate, sh.block
    table, _ = _query_table(sh, lay, dst)
    rows_of_segment = length // r
    needed = [
        blk for blk in torch.nonzero(table.any(0)).flatten().tolist() if blk * b < rows_of_segment
    ]
    parts = []
    for p in range(min(r, sh.heads)):
        mine = [blk for blk in needed if (start + blk * b * r) // sh.shard == src]
        if not mine:
            continue
        rows = torch.cat(
            [torch.arange(blk * b, min((blk + 1) * b, rows_of_segment)) for blk in mine]
        )
        parts.append((start + p + rows * r, _phase_kv_heads(sh, r, p)))
    return tuple(parts)


def _rows(transfer: _Transfer) -> int:
    """Key/value rows times heads of a transfer (multiply by batch, head_dim, 2 for k and v)."""
    return sum(len(pos) * len(heads) for pos, heads in transfer)


def _pack(x: torch.Tensor, y: torch.Tensor, transfer: _Transfer, offset: int) -> torch.Tensor:
    """``(batch, F)``: the transfer's rows of ``x`` then of ``y`` (positions minus ``offset``)."""
    parts = []
    for t in (x, y):
        for pos, heads in transfer:
            rows = t.index_select(1, (pos - offset).to(t.device))
            parts.append(rows.index_select(2, torch.tensor(heads, device=t.device)).flatten(1))
    return torch.cat(parts, dim=1)


def _unpack(
    flat: torch.Tensor,
    transfer: _Transfer,
    targets: tuple[torch.Tensor, torch.Tensor],
    offset: int,
    add: bool,
) -> None:
    """Write (or add) a packed block into the rows ``pos - offset`` of the two targets."""
    b, d = flat.shape[0], targets[0].shape[-1]
    at = 0
    for t in targets:
        for pos, heads in transfer:
            n = len(pos) * len(heads) * d
            part = flat[:, at : at + n].reshape(b, len(pos), len(heads), d).to(t.dtype)
            at += n
            rows = (pos - offset).to(t.device)[:, None]
            cols = torch.tensor(heads, device=t.device)[None, :]
            if add:
                t[:, rows, cols] += part
            else:
                t[:, rows, cols] = part


def _spanning_runs(sh: _Shards, i: int, lay: BranchLayout, rank: int) -> list[RunTable]:
    _, length = _segment(sh, lay.segment_length, rank)
    table, a0 = _query_table(sh, lay, rank)
    runs = _branch_runs(length, sh.heads, sh.kv_heads, i, length, lay.dilation_rate)
    return [(dataclasses.replace(run, q_shift=a0 * sh.block), table) for run in runs]


def comm_bytes(
    layouts: Sequence[BranchLayout],
    block_size: int,
    *,
    world_size: int,
    rank: int,
    shard: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    is_causal: bool,
    dtype: torch.dtype,
    key_padding_mask: bool = False,
) -> dict[str, int]:
    """Bytes ``rank`` sends in one call: ``"forward"`` (key/value rows in ``dtype``, and with a
    ``key_padding_mask`` its shard, one byte a token, to every peer when a branch spans ranks)
    and ``"backward"`` (the rows' gradients back to their owners, float32, float64 for float64)."""
    sh = _Shards(shard * world_size, shard, world_size, heads, kv_heads, block_size, is_causal)
    spanning = check_sharding(layouts, shard, world_size, block_size)
    work = torch.empty(0, dtype=compute_dtype(dtype)).element_size()
    size = torch.empty(0, dtype=dtype).element_size()
    fwd = bwd = 0
    for lay, spans in zip(layouts, spanning):
        if not spans or world_size == 1:
            continue
        for peer in range(world_size):
            if peer != rank:
                fwd += 2 * batch * head_dim * size * _rows(_transfer(sh, lay, peer, rank))
                bwd += 2 * batch * head_dim * work * _rows(_transfer(sh, lay, rank, peer))
    if key_padding_mask and world_size > 1 and any(spanning):
        fwd += (world_size - 1) * batch * shard
    return {"forward": fwd, "backward": bwd}


def _gather(
    sh: _Shards, lay: BranchLayout, k: torch.Tensor, v: torch.Tensor, comm: Transport
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's key/value buffers with the rows this rank's queries need filled in."""
    rank = comm.rank
    start, length = _segment(sh, lay.segment_length, rank)
    b, _, hkv, d = k.shape
    offsets = {src: src * sh.shard for src in range(sh.world)}
    sends = []
    for dst in range(sh.world):
        tr = _transfer(sh, lay, dst, rank)
        if dst != rank and tr:
            sends.append((_pack(k, v, tr, offsets[rank]), comm.peer(dst)))
    sources = [(src, _transfer(sh, lay, rank, src)) for src in range(sh.world) if src != rank]
    sources = [(src, tr) for src, tr in sources if tr]
    recvs = [((b, 2 * _rows(tr) * d), k.dtype, comm.peer(src)) for src, tr in sources]
    received = comm.exchange_many(sends, recvs)
    kbuf = k.new_zeros(b, length, hkv, d)
    vbuf = v.new_zeros(b, length, hkv, d)
    own = _transfer(sh, lay, rank, rank)
    if own:
        _unpack(_pack(k, v, own, offsets[rank]), own, (kbuf, vbuf), start, add=False)
    for (_, tr), flat in zip(sources, received):
        _unpack(flat, tr, (kbuf, vbuf), start, add=False)
        comm.release(flat)
    return kbuf, vbuf


def _return_grads(
    sh: _Shards,
    lay: BranchLayout,
    dkbuf: torch.Tensor,
    dvbuf: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    comm: Transport,
) -> None:
    """Send the gradients of the gathered rows to their owners; add those of this rank's rows."""
    rank = comm.rank
    start, _ = _segment(sh, lay.segment_length, rank)
    b, d = dk.shape[0], dk.shape[-1]
    here = rank * sh.shard
    sends = []
    for src in range(sh.world):
        tr = _transfer(sh, lay, rank, src)
        if src != rank and tr:
            sends.append((_pack(dkbuf, dvbuf, tr, start), comm.peer(src)))
    users = [(dst, _transfer(sh, lay, dst, rank)) for dst in range(sh.world) if dst != rank]
    users = [(dst, tr) for dst, tr in users if tr]
    recvs = [((b, 2 * _rows(tr) * d), dkbuf.dtype, comm.peer(dst)) for dst, tr in users]
    received = comm.exchange_many(sends, recvs)
    own = _transfer(sh, lay, rank, rank)
    if own:
        _unpack(_pack(dkbuf, dvbuf, own, start), own, (dk, dv), here, add=True)
    for (_, tr), flat in zip(users, received):
        _unpack(flat, tr, (dk, dv), here, add=True)
        comm.release(flat)


@dataclass(frozen=True)
class _ShardedCall:
    sh: _Shards
    layouts: tuple[BranchLayout, ...]
    spanning: tuple[bool, ...]
    scale: float
    group: Any
    timeout_s: float | None
    dropout_p: float = 0.0
    dropout_seed: int | None = None

    def options(self, branch: int | None, mask: torch.Tensor | None) -> dict[str, Any]:
        """Keywords of [`forward_into`][dilated.sparse.engine.forward_into] for the local
        branches (``branch`` None) or one spanning branch: each its own dropout seeds."""
        seed = derive_dropout_seed(self.dropout_seed, -1 if branch is None else branch)
        return {
            "scale": self.scale,
            "is_causal": self.sh.causal,
            "key_padding_mask": mask,
            "dropout_p": self.dropout_p,
            "dropout_seed": seed,
        }


def _segment_mask(
    sh: _Shards, lay: BranchLayout, rank: int, whole: torch.Tensor | None
) -> torch.Tensor | None:
    """The ``(batch, segment)`` key padding mask of the gathered keys' buffer."""
    if whole is None:
        return None
    start, length = _segment(sh, lay.segment_length, rank)
    return whole[:, start : start + length]


class _ShardedBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: _ShardedCall,
        mask: torch.Tensor | None,
        whole_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sh = call.sh
        comm = make_comm(call.group, call.timeout_s)
        _, n, h, _ = q.shape
        # forward_into(empty=True) fills only what the local branches do not write first.
        acc, acc_lse = uninitialized_accumulators(q)
        local = [lay for lay, spans in zip(call.layouts, call.spanning) if not spans]
        runs = _run_tables(local, n, h, k.shape[2])
        options = call.options(None, mask)
        forward_into(runs, sh.block, q, k, v, acc, acc_lse, empty=True, **options)
        gathered = []
        for i, (lay, spans) in enumerate(zip(call.layouts, call.spanning)):
            if spans:
                kbuf, vbuf = _gather(sh, lay, k, v, comm)
                runs = _spanning_runs(sh, i, lay, comm.rank)
                options = call.options(i, _segment_mask(sh, lay, comm.rank, whole_mask))
                forward_into(runs, sh.block, q, kbuf, vbuf, acc, acc_lse, **options)
                gathered += [kbuf, vbuf]
        out = acc.to(q.dtype)
        lse = acc_lse[..., 0].transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, *gathered)
        ctx.call = call
        ctx.masks = (mask, whole_mask)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, *gathered = ctx.saved_tensors
        call: _ShardedCall = ctx.call
        mask, whole_mask = ctx.masks
        sh = call.sh
        comm = make_comm(call.group, call.timeout_s)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        work = compute_dtype(q.dtype)
        lse4 = lse.transpose(1, 2).unsqueeze(-1).contiguous()
        dq, dk, dv = (torch.zeros(x.shape, dtype=work, device=q.device) for x in (q, k, v))
        local = [lay for lay, spans in zip(call.layouts, call.spanning) if not spans]
        if local:
            runs = _run_tables(local, q.shape[1], q.shape[2], k.shape[2])
            options = call.options(None, mask)
            backward_into(runs, sh.block, grad_out, q, k, v, out, lse4, dq, dk, dv, **options)
        bufs = iter(gathered)
        for i, (lay, spans) in enumerate(zip(call.layouts, call.spanning)):
            if spans:
                kbuf, vbuf = next(bufs), next(bufs)
                dkbuf = torch.zeros(kbuf.shape, dtype=work, device=q.device)
                dvbuf = torch.zeros(vbuf.shape, dtype=work, device=q.device)
                runs = _spanning_runs(sh, i, lay, comm.rank)
                options = call.options(i, _segment_mask(sh, lay, comm.rank, whole_mask))
                backward_into(
                    runs, sh.block, grad_out, q, kbuf, vbuf, out, lse4, dq, dkbuf, dvbuf,
                    **options,
                )  # fmt: skip
                _return_grads(sh, lay, dkbuf, dvbuf, dk, dv, comm)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _config_fields(config: object) -> tuple[object, ...]:
    """The config's fields every rank must agree on, shown by name when they differ (its
    custom table or function is compared through the resolved layouts' digest)."""
    if not isinstance(config, SparsePatternConfig):
        return (type(config).__name__,)
    return (
        config.pattern_type,
        config.sparsity_ratio,
        config.block_size,
        config.local_window_size,
        config.global_tokens,
    )


def block_sparse_ring_dilated_attention(
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
    group: Any = None,
    timeout_s: float | None = None,
    return_lse: bool = False,
    check_finite: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[`block_sparse_dilated_attention`][dilated.sparse.block_sparse_dilated_attention] of a
    sequence split into contiguous shards over the ranks of ``group``.

    Every rank calls it with its shard; the result is this rank's rows of the single-process
    result on the whole sequence, and so are the gradients. Before any transfer every rank
    checks its arguments and the ranks agree on them (dilated-ring's
    [`check_call`][dilated.ring.validation.check_call], as
    [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention] does), the
    resolved layouts included: a bad argument or a disagreement on any rank makes every rank
    raise at once, naming the argument or option.

    Args:
        q: this rank's queries ``(batch, seq / P, heads, head_dim)`` (rank ``i`` holds positions
            ``i * seq / P ..``).
        k, v: ``(batch, seq / P, kv_heads, head_dim)``.
        segment_lengths, dilation_rates, sparse_config, scale, is_causal: as in the
            single-process op, identical on every rank (see
            `check_sharding` for the segments that
            can be split); a custom layout must resolve to the same tables on every rank.
        key_padding_mask: this rank's ``(batch, seq / P)`` shard in PyTorch's convention (bool True or float ``-inf`` = ignored) or
            None; gathered once (``batch * seq / P`` bytes per rank) when a branch spans ranks.
        dropout_p: dropout on the probabilities; each rank draws its seed from torch's default
            generator (its masks differ from the single-process op's).
        group: a ``torch.distributed`` process group (None: the default one, or a world of one
            when torch.distributed is not initialised) or a
            [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup].
        timeout_s: bound of every wait, None or a finite positive number of seconds.
        return_lse: also return this rank's ``(batch, heads, seq / P)`` log-sum-exp.
        check_finite: raise ``ValueError`` (on every rank) when a rank's q, k or v holds NaN or
            Inf; None (default) reads the environment variable ``DILATED_CHECK_FINITE``, see
            [`resolve_check_finite`][dilated.core.checks.resolve_check_finite].

    Returns:
        ``out`` ``(batch, seq / P, heads, head_dim)`` in the dtype of ``q`` (and the LSE).

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree.
        TimeoutError: when a peer rank does not join a transfer within ``timeout_s``.
    """
    group = as_process_group(group)
    _, world = group_rank_and_size(group)
    # Resolved before the agreement, so that the ranks compare the layouts themselves (a custom
    # table or function has no other comparable form); a failure is reported inside it.
    resolved: ResolvedLayouts | None = None
    layout_error: Exception | None = None
    try:
        resolved = resolve(sparse_config, segment_lengths, dilation_rates)
    except Exception as exc:  # re-raised by the local checks, once every rank has joined
        layout_error = exc
    spanning: list[bool] = []

    def sharding_checks(call: CheckedCall) -> None:
        if layout_error is not None:
            raise layout_error
        assert resolved is not None
        if world > 1:  # a world of one holds the whole sequence: any length, as the op takes
            spanning.extend(
                check_sharding(resolved.layouts, q.shape[1], world, resolved.block_size)
            )

    digest = None if resolved is None else hashlib.sha256(resolved.key.encode()).hexdigest()[:16]
    options = {
        "sparse_config": _config_fields(sparse_config),
        "sparse_config (resolved layout)": digest,
    }
    call = check_call(
        q, k, v, segment_lengths, dilation_rates, scale=scale, is_causal=is_causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, return_lse=return_lse,
        check_finite=check_finite, group=group, world_size=world, timeout_s=timeout_s,
        options=options, checks=sharding_checks,
    )  # fmt: skip
    assert resolved is not None
    if world == 1:
        out, lse = sparse_op(
            q, k, v, call.segment_lengths, call.dilation_rates, resolved.key, call.scale,
            is_causal, call.key_mask, dropout_p,
        )  # fmt: skip
        return (out, lse) if return_lse else out
    _, shard, heads, _ = q.shape
    sh = _Shards(shard * world, shard, world, heads, k.shape[2], resolved.block_size, is_causal)
    seed = dropout_seed_value(draw_dropout_seed(dropout_p))
    timeout = call.timeout_s
    run = _ShardedCall(
        sh, resolved.layouts, tuple(spanning), call.scale, group, timeout, dropout_p, seed
    )
    key_mask, whole_mask = call.key_mask, None
    if key_mask is not None and any(spanning):
        comm = make_comm(group, timeout)
        whole_mask = gather_key_padding_mask(key_mask, "contiguous", world, comm)
    out, lse = _ShardedBlockSparse.apply(q, k, v, run, key_mask, whole_mask)
    return (out, lse) if return_lse else out
