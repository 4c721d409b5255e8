"""Block-sparse dilated attention over a sequence split into contiguous shards across ranks.

A branch whose segments lie inside a shard (``w`` divides the shard length ``S``) is *local*:
the single-process engine on the shard, no transfer. A branch whose segment spans ranks
(``S`` divides ``w``, or the whole sequence for ``w >= seq``) is *spanning*: dilated-ring's
all-gather schedule ([`run_forward`][dilated.ring.schedule.run_forward] and
[`run_backward`][dilated.ring.schedule.run_backward]) with the block-sparse block body
([`BlockSparseBody`][dilated.sparse.block_body.BlockSparseBody]): each rank receives exactly
the rows of K/V its query tiles read, in one exchange per branch, and in the backward pass the
key/value gradients of those rows go back to their owners (float32). Blocks outside the layout
are neither sent nor computed. The forward pass keeps the received rows for the backward pass,
which sends only gradients.

Both paths of the single-process op ([`dilated.sparse.paths`][dilated.sparse.paths]) run here,
chosen by the same rule on the rank's shard: on ``"flash4"`` the local branches are the flash4
path on the shard and the spanning branches run
[`Flash4SparseBody`][dilated.sparse.block_body.Flash4SparseBody]; on ``"tiles"`` both are the
engine's tiles.

[`comm_bytes`][dilated.sparse.distributed.comm_bytes] is the cost model of those transfers; the
tests compare it with the bytes the transport counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.core.config import SparsePatternConfig
from dilated.core.reference import derive_dropout_seed, draw_dropout_seed, dropout_seed_value
from dilated.core.sparsity import BranchLayout
from dilated.kernels.merge import merge_into
from dilated.ring.comm import gather_key_padding_mask, make_comm
from dilated.ring.functional import as_process_group, group_rank_and_size
from dilated.ring.schedule import Kept, run_backward, run_forward
from dilated.ring.schedules import get_schedule
from dilated.ring.validation import CheckedCall, check_call
from dilated.sparse import flash4_path
from dilated.sparse.block_body import (
    BlockSparseBody,
    Flash4SparseBody,
    Shards,
    SparseBackwardRows,
    SparseForwardRows,
    needed_rows,
    transfer_elements,
)
from dilated.sparse.engine import (
    backward_into,
    forward_into,
    run_tables,
    uninitialized_accumulators,
)
from dilated.sparse.functional import ResolvedLayouts, resolve, sparse_op
from dilated.sparse.paths import choose_path

__all__ = [
    "block_sparse_ring_dilated_attention",
    "check_sharding",
    "comm_bytes",
    "sparse_ring_passes",
]

#: The blocks of a sparse body differ per reader: each goes straight to it.
_SCHEDULE = get_schedule("allgather")


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
    sh = Shards(shard * world_size, shard, world_size, heads, kv_heads, block_size, is_causal)
    spanning = check_sharding(layouts, shard, world_size, block_size)
    work = torch.empty(0, dtype=compute_dtype(dtype)).element_size()
    size = torch.empty(0, dtype=dtype).element_size()
    fwd = bwd = 0
    for lay, spans in zip(layouts, spanning):
        if not spans or world_size == 1:
            continue
        for peer in range(world_size):
            if peer != rank:
                fwd += (
                    2
                    * batch
                    * head_dim
                    * size
                    * transfer_elements(needed_rows(sh, lay, peer, rank))
                )
                bwd += (
                    2
                    * batch
                    * head_dim
                    * work
                    * transfer_elements(needed_rows(sh, lay, rank, peer))
                )
    if key_padding_mask and world_size > 1 and any(spanning):
        fwd += (world_size - 1) * batch * shard
    return {"forward": fwd, "backward": bwd}


@dataclass(frozen=True)
class _ShardedCall:
    sh: Shards
    layouts: tuple[BranchLayout, ...]
    spanning: tuple[bool, ...]
    scale: float
    group: Any
    timeout_s: float | None
    layout_key: str
    path: str
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

    def spanning_options(
        self, branch: int, rank: int, whole_mask: torch.Tensor | None
    ) -> dict[str, Any]:
        """``options`` of a spanning branch, with the key padding mask of its segment buffer."""
        mask = None
        if whole_mask is not None:
            length = min(self.layouts[branch].segment_length, self.sh.seq)
            start = (rank * self.sh.shard) // length * length
            mask = whole_mask[:, start : start + length]
        return self.options(branch, mask)

    def local_layouts(self) -> list[BranchLayout]:
        return [lay for lay, spans in zip(self.layouts, self.spanning) if not spans]

    def local_runs(self, q: torch.Tensor, k: torch.Tensor) -> list[Any]:
        return run_tables(self.local_layouts(), q.shape[1], q.shape[2], k.shape[2])

    def flash4_options(self, mask: torch.Tensor | None) -> dict[str, Any]:
        """Keywords of the flash4 path on the local branches (the shard fixes which they are)."""
        return {
            "scale": self.scale,
            "is_causal": self.sh.causal,
            "key_padding_mask": mask,
            "layout_key": f"{self.layout_key}|local branches",
        }

    def body(
        self, i: int, rank: int, k: torch.Tensor, v: torch.Tensor,
        rows: SparseForwardRows | SparseBackwardRows, whole_mask: torch.Tensor | None,
    ) -> BlockSparseBody:  # fmt: skip
        """The block body of spanning branch ``i`` on the call's path."""
        options = self.spanning_options(i, rank, whole_mask)
        lay = self.layouts[i]
        body = Flash4SparseBody if self.path == "flash4" else BlockSparseBody
        return body(self.sh, i, lay, rank, k, v, rows, options, self.layout_key)


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
        # forward_into(empty=True) fills only what the local branches do not write first.
        acc, acc_lse = uninitialized_accumulators(q)
        local = call.local_layouts()
        if call.path == "tiles":
            options = call.options(None, mask)
            runs = call.local_runs(q, k)
            forward_into(runs, sh.block, q, k, v, acc, acc_lse, empty=True, **options)
        elif local:
            out, lse = flash4_path.forward(q, k, v, local, sh.block, **call.flash4_options(mask))
            merge_into(acc, acc_lse[..., 0].transpose(1, 2), out, lse, first=True)
        else:
            acc.zero_()
            acc_lse.fill_(float("-inf"))
        rows = SparseForwardRows(q, acc, acc_lse)
        kept: list[Kept] = []
        for i, spans in enumerate(call.spanning):
            if spans:
                kept.append({})
                body = call.body(i, comm.rank, k, v, rows, whole_mask)
                run_forward(_SCHEDULE, body, comm, kept[-1])
        out = acc.to(q.dtype)
        lse = acc_lse[..., 0].transpose(1, 2).contiguous()
        # The received rows are kept for the backward pass, which then sends only gradients.
        ctx.sources = [list(blocks) for blocks in kept]
        ctx.save_for_backward(q, k, v, out, lse, *(t for b in kept for t in b.values()))
        ctx.call = call
        ctx.masks = (mask, whole_mask)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, _grad_lse: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, *received = ctx.saved_tensors
        call: _ShardedCall = ctx.call
        mask, whole_mask = ctx.masks
        sh = call.sh
        comm = make_comm(call.group, call.timeout_s)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.contiguous()
        work = compute_dtype(q.dtype)
        lse4 = lse.transpose(1, 2).unsqueeze(-1).contiguous()
        dq, dk, dv = (torch.zeros(x.shape, dtype=work, device=q.device) for x in (q, k, v))
        local = call.local_layouts()
        if call.path == "tiles" and local:
            options = call.options(None, mask)
            runs = call.local_runs(q, k)
            backward_into(runs, sh.block, grad_out, q, k, v, out, lse4, dq, dk, dv, **options)
        elif local:
            grads = flash4_path.backward(
                grad_out, q, k, v, out, lse, local, sh.block, **call.flash4_options(mask)
            )
            for acc, grad in zip((dq, dk, dv), grads):
                acc.add_(grad)
        rows = SparseBackwardRows(q, grad_out, out, lse4, dq, dk, dv)
        blocks = iter(received)
        sources = iter(ctx.sources)
        for i, spans in enumerate(call.spanning):
            if spans:
                kept = {src: next(blocks) for src in next(sources)}
                body = call.body(i, comm.rank, k, v, rows, whole_mask)
                run_backward(_SCHEDULE, body, comm, kept)
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
    prepared = _prepare(
        q, k, v, segment_lengths, dilation_rates, sparse_config, scale, is_causal,
        key_padding_mask, dropout_p, group, timeout_s, return_lse, check_finite,
    )  # fmt: skip
    if isinstance(prepared, _SingleCall):
        out, lse = prepared.run(q, k, v)
    else:
        out, lse = _ShardedBlockSparse.apply(q, k, v, *prepared)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class _SingleCall:
    """A world of one: the single-process op's checked arguments."""

    segment_lengths: list[int]
    dilation_rates: list[int]
    layout_key: str
    scale: float
    is_causal: bool
    key_mask: torch.Tensor | None
    dropout_p: float

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of [`sparse_op`][dilated.sparse.functional.sparse_op]."""
        return sparse_op(
            q, k, v, self.segment_lengths, self.dilation_rates, self.layout_key, self.scale,
            self.is_causal, self.key_mask, self.dropout_p,
        )  # fmt: skip


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
    dilation_rates: Sequence[int], sparse_config: SparsePatternConfig, scale: float | None,
    is_causal: bool, key_padding_mask: torch.Tensor | None, dropout_p: float, group: Any,
    timeout_s: float | None, return_lse: bool, check_finite: bool | None,
) -> _SingleCall | tuple[_ShardedCall, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The checked call of every rank: a world of one's arguments of the single-process op, or
    the sharded call, this rank's key mask and the gathered one."""
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
        return _SingleCall(
            list(call.segment_lengths), list(call.dilation_rates), resolved.key, call.scale,
            is_causal, call.key_mask, dropout_p,
        )  # fmt: skip
    _, shard, heads, _ = q.shape
    sh = Shards(shard * world, shard, world, heads, k.shape[2], resolved.block_size, is_causal)
    seed = dropout_seed_value(draw_dropout_seed(dropout_p))
    timeout = call.timeout_s
    run = _ShardedCall(
        sh, resolved.layouts, tuple(spanning), call.scale, group, timeout, resolved.key,
        choose_path(q, k, dropout_p=dropout_p), dropout_p, seed,
    )  # fmt: skip
    key_mask, whole_mask = call.key_mask, None
    if key_mask is not None and any(spanning):
        comm = make_comm(group, timeout)
        whole_mask = gather_key_padding_mask(key_mask, "contiguous", world, comm)
    return run, key_mask, whole_mask


class _PassContext:
    """Autograd's context, for both passes driven directly."""

    saved_tensors: tuple[torch.Tensor, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        pass


def sparse_ring_passes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    sparse_config: SparsePatternConfig,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    group: Any = None,
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's forward and backward passes of
    [`block_sparse_ring_dilated_attention`][dilated.sparse.distributed.block_sparse_ring_dilated_attention]
    without autograd: ``(out, dq, dk, dv)``, ``d_out`` the gradient of this rank's output rows.

    For ranks that are [`dilated.ring.loopback`][dilated.ring.loopback] threads on CUDA, where
    autograd runs every backward of a device on one engine thread, so the ranks' backward
    passes would wait for each other there (as
    [`ring_passes`][dilated.ring.ring.ring_passes]). Arguments as there, checked the same way.
    """
    prepared = _prepare(
        q, k, v, segment_lengths, dilation_rates, sparse_config, None, is_causal,
        key_padding_mask, 0.0, group, timeout_s, False, None,
    )  # fmt: skip
    if isinstance(prepared, _SingleCall):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, _ = prepared.run(*leaves)
        dq, dk, dv = torch.autograd.grad(out, leaves, d_out)
        return out.detach(), dq, dk, dv
    ctx = _PassContext()
    out, _ = _ShardedBlockSparse.forward(ctx, q, k, v, *prepared)
    dq, dk, dv, *_ = _ShardedBlockSparse.backward(ctx, d_out, None)
    return out, dq, dk, dv
