"""Which tokens each rank holds: contiguous, zigzag or striped shards of the sequence.

``contiguous``: rank ``i`` holds ``[i*s, (i+1)*s)`` with ``s = n / P``.
``zigzag``: the sequence is cut into ``2P`` chunks; rank ``i`` holds chunks ``i`` and ``2P-1-i``,
so every rank gets the same amount of causal work.
``striped``: rank ``i`` holds positions ``i, i+P, i+2P, ...``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["LoadBalance", "chunk_length", "positions", "shard", "shard_positions", "unshard"]

LoadBalance = Literal["contiguous", "zigzag", "striped"]
_MODES = ("contiguous", "zigzag", "striped")


def _check(seq: int, world_size: int, mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"load_balance must be one of {_MODES}, got {mode!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    parts = 2 * world_size if mode == "zigzag" else world_size
    if seq % parts != 0:
        raise ValueError(
            f"sequence length {seq} must be divisible by {parts} "
            f"({'2 * ' if mode == 'zigzag' else ''}world_size={world_size}) for {mode} sharding"
        )


def chunk_length(seq: int, world_size: int, mode: str) -> int:
    """Length of the runs of consecutive positions that a rank holds."""
    _check(seq, world_size, mode)
    if mode == "contiguous":
        return seq // world_size
    if mode == "zigzag":
        return seq // (2 * world_size)
    return 1


def positions(
    seq: int, rank: int, world_size: int, mode: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global positions (long, ascending) of the ``seq / world_size`` tokens of ``rank``."""
    _check(seq, world_size, mode)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    s = seq // world_size
    if mode == "contiguous":
        return torch.arange(rank * s, (rank + 1) * s, device=device)
    if mode == "zigzag":
        c = s // 2
        first = torch.arange(rank * c, (rank + 1) * c, device=device)
        j = 2 * world_size - 1 - rank
        return torch.cat([first, torch.arange(j * c, (j + 1) * c, device=device)])
    return torch.arange(rank, seq, world_size, device=device)


def shard(
    x: torch.Tensor, rank: int, world_size: int, mode: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """The part of ``x`` (whole sequence along ``dim``) that ``rank`` holds."""
    idx = positions(x.shape[dim], rank, world_size, mode, device=x.device)
    return x.index_select(dim, idx)


def shard_positions(
    position_ids: torch.Tensor, rank: int, world_size: int, mode: str = "contiguous"
) -> torch.Tensor:
    """Shard position ids ``(batch, seq)`` or ``(seq,)`` along their last dim (for rotary embeddings)."""
    return shard(position_ids, rank, world_size, mode, dim=position_ids.dim() - 1)


def unshard(shards: list[torch.Tensor], mode: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Reassemble the whole sequence from every rank's shard (``shards[i]`` from rank ``i``)."""
    world_size = len(shards)
    seq = sum(t.shape[dim] for t in shards)
    order = torch.cat([positions(seq, i, world_size, mode) for i in range(world_size)])
    stacked = torch.cat(shards, dim=dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq)
    return stacked.index_select(dim, inverse.to(stacked.device))
