"""Checks of a distributed call that every rank must agree on, done before the first transfer.

A rank that finds its own input bad must not simply raise: the others would wait forever in the
next collective. So every rank runs its local checks, then all ranks exchange one small metadata
tensor (one ``all_gather``), and every rank raises the same ``ValueError`` when any rank's check
failed or the ranks disagree on shapes, dtypes or options.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dilated.ring.comm import wait_all

__all__ = ["agree_across_ranks", "check_branch_layout"]

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_FIELDS = ("error", "batch", "shard_len", "heads", "kv_heads", "head_dim", "dtype", "options")


def _metadata(q: torch.Tensor, k: torch.Tensor, options: int, failed: bool) -> torch.Tensor:
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
    b, s, h, d = (*q.shape, 0, 0, 0, 0)[:4] if q.dim() <= 4 else (0, 0, 0, 0)
    hkv = k.shape[2] if k.dim() == 4 else 0
    return torch.tensor([int(failed), b, s, h, hkv, d, dtype, options], dtype=torch.int64)


def agree_across_ranks(
    q: torch.Tensor,
    k: torch.Tensor,
    options: int,
    local_checks: Callable[[], None],
    group: dist.ProcessGroup | None,
    *,
    timeout_s: float | None = None,
) -> None:
    """Run ``local_checks`` here and make every rank raise if any rank's checks fail or disagree.

    Args:
        q, k: this rank's shards (only their shapes and dtypes are exchanged).
        options: an integer fingerprint of the call options (branches, causal, sharding) that
            must be identical on every rank.
        local_checks: raises ``ValueError``/``TypeError`` for a bad local input.
        group: process group (None: default).
        timeout_s: raise :class:`TimeoutError` when a peer has not joined the exchange within
            this many seconds (None: the process group's timeout).
    """
    error: Exception | None = None
    try:
        local_checks()
    except (ValueError, TypeError) as exc:
        error = exc
    world = dist.get_world_size(group)
    if world == 1:
        if error is not None:
            raise error
        return
    mine = _metadata(q, k, options, error is not None)
    # gloo and NCCL both gather a tensor on the inputs' device; the metadata is tiny.
    device = q.device if q.device.type != "cpu" and dist.get_backend(group) == "nccl" else "cpu"
    gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
    work = dist.all_gather(gathered, mine.to(device), group=group, async_op=True)
    assert work is not None
    wait_all([work], timeout_s, f"the cross-rank input check (rank {dist.get_rank(group)})")
    rows = torch.stack([g.cpu() for g in gathered])
    rank = dist.get_rank(group)
    if error is not None:
        raise ValueError(f"rank {rank}: {error}") from error
    bad = [i for i in range(world) if rows[i, 0] != 0]
    if bad:
        raise ValueError(f"invalid input on rank(s) {bad}; see the error raised on those ranks")
    for col, name in enumerate(_FIELDS[1:], start=1):
        values = rows[:, col].tolist()
        if len(set(values)) > 1:
            shown = [_DTYPES[x] if name == "dtype" else x for x in values]
            raise ValueError(
                f"every rank must pass shards of one {name}, got {shown} on ranks 0..{world - 1}"
            )


def check_branch_layout(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    shard_len: int,
    world_size: int,
    chunk_len: int,
    mode: str,
) -> None:
    """Raise unless every branch either fits in a chunk or spans whole shards.

    Contiguous shards: a segment must lie inside one shard (``shard_len % w == 0``), cover whole
    shards (``w % shard_len == 0``) or the whole sequence. Zigzag and striped shards accept any
    branch (a spanning branch rotates over every rank).
    """
    seq = shard_len * world_size
    for i, w in enumerate(segment_lengths):
        if chunk_len % w == 0 or w >= seq:
            continue
        if mode == "contiguous" and w % shard_len != 0:
            raise ValueError(
                f"segment_lengths[{i}] = {w} does not split evenly over the ranks it spans: with "
                f"shards of {shard_len} tokens ({world_size} ranks, {seq} tokens) a segment must "
                f"divide the shard length or be a multiple of it"
            )
