"""Helpers for sequence-parallel dilated attention inside a DeepSpeed engine.

``pip install 'dilated-ring[deepspeed]'``; this module imports without DeepSpeed (it is looked
up only when used).

* [`sequence_parallel_groups`][dilated.ring.deepspeed.sequence_parallel_groups] cuts the world into sequence-parallel groups of consecutive
  ranks (each holds the shards of one sequence) and the matching data-parallel groups.
* [`CheckpointedAttention`][dilated.ring.deepspeed.CheckpointedAttention] recomputes an attention layer in the backward pass instead of
  storing its activations, through ``deepspeed.checkpointing`` once that is configured
  (``deepspeed.checkpointing.configure(...)``), else through ``torch.utils.checkpoint``.

Gradients need no special handling: DeepSpeed averages them over all ranks, and when every rank's
loss is the mean over its shard's tokens (shards of equal size), that average is the gradient of
the mean loss over the whole batch, for ZeRO stages 0 to 3 alike.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedAttention", "SequenceParallelGroups", "sequence_parallel_groups"]


@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's groups: ``sequence`` (pass it as ``group=`` to the attention) and ``data``.

    Attributes:
        sequence: the ``sequence_size`` consecutive ranks that share one sequence.
        data: the ranks that hold the same shard index of different sequences.
        sequence_rank: this rank's index in ``sequence`` (its shard index).
        sequence_size: ranks per sequence ``P``.
        data_rank: index of this rank's sequence group (which sequence of the batch it holds).
        data_size: number of sequence groups.
    """

    sequence: dist.ProcessGroup
    data: dist.ProcessGroup
    sequence_rank: int
    sequence_size: int
    data_rank: int
    data_size: int


def sequence_parallel_groups(
    sequence_parallel_size: int,
    *,
    timeout_s: float | None = None,
    backend: str | None = None,
) -> SequenceParallelGroups:
    """Split the default group into sequence-parallel groups of consecutive ranks.

    Every rank must call it (it creates every group, a collective step). Rank ``i`` goes to
    sequence group ``i // P`` at shard index ``i % P``.

    Args:
        sequence_parallel_size: ``P``, ranks per sequence; must divide the world size.
        timeout_s: timeout of the new groups (None: the default group's).
        backend: backend of the new groups (None: the default group's).

    Returns:
        This rank's [`SequenceParallelGroups`][dilated.ring.deepspeed.SequenceParallelGroups].

    Raises:
        ValueError: when torch.distributed is not initialised or ``P`` does not divide the world.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "sequence_parallel_groups needs an initialised default process group "
            "(torch.distributed.init_process_group or deepspeed.init_distributed)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if (
        isinstance(sequence_parallel_size, bool)
        or not isinstance(sequence_parallel_size, int)
        or sequence_parallel_size < 1
        or world % sequence_parallel_size != 0
    ):
        raise ValueError(
            f"sequence_parallel_size must be a positive integer dividing the world size {world}, "
            f"got {sequence_parallel_size!r}"
        )
    p = sequence_parallel_size
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    mine_seq: dist.ProcessGroup | None = None
    mine_data: dist.ProcessGroup | None = None
    # new_group is collective: every rank creates every group, in the same order.
    for g in range(world // p):
        group = dist.new_group(list(range(g * p, (g + 1) * p)), timeout=timeout, backend=backend)
        if rank // p == g:
            assert isinstance(group, dist.ProcessGroup)
            mine_seq = group
    for i in range(p):
        group = dist.new_group(list(range(i, world, p)), timeout=timeout, backend=backend)
        if rank % p == i:
            assert isinstance(group, dist.ProcessGroup)
            mine_data = group
    assert mine_seq is not None and mine_data is not None
    return SequenceParallelGroups(
        sequence=mine_seq,
        data=mine_data,
        sequence_rank=rank % p,
        sequence_size=p,
        data_rank=rank // p,
        data_size=world // p,
    )


def _deepspeed_checkpointing_configured() -> bool:
    if importlib.util.find_spec("deepspeed") is None:
        return False
    from deepspeed import checkpointing

    return bool(checkpointing.is_configured())


class CheckpointedAttention(nn.Module):
    """Wrap a multi-head attention layer so that its activations are recomputed in backward.

    Call it like the layer: ``(query, key, value, is_causal=None) -> (out, None)`` with
    ``(batch, seq / P, embed_dim)`` shards. Every rank recomputes, so the layer's transfers run
    again in the backward pass (in the same order on every rank).

    Args:
        layer: e.g. [`RingMultiheadDilatedAttention`][dilated.ring.modules.RingMultiheadDilatedAttention]; it must return
            ``(out, anything)``.
        use_deepspeed: ``True``: ``deepspeed.checkpointing.checkpoint`` (it must be configured);
            ``False``: ``torch.utils.checkpoint``; None (default): DeepSpeed's when configured.
    """

    def __init__(self, layer: nn.Module, use_deepspeed: bool | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.use_deepspeed = use_deepspeed

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: int) -> torch.Tensor:
        # is_causal travels as an int: DeepSpeed's checkpoint keeps only tensors and plain values.
        is_causal = None if causal < 0 else bool(causal)
        out: torch.Tensor = self.layer(q, k, v, is_causal=is_causal)[0]
        return out

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        is_causal: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Run the layer, recomputing it in backward when gradients are enabled."""
        causal = -1 if is_causal is None else int(is_causal)
        if not torch.is_grad_enabled():
            return self._run(query, key, value, causal), None
        use_ds = self.use_deepspeed
        if use_ds is None:
            use_ds = _deepspeed_checkpointing_configured()
        if use_ds:
            from deepspeed import checkpointing

            out: torch.Tensor = checkpointing.checkpoint(self._run, query, key, value, causal)
        else:
            out = checkpoint(self._run, query, key, value, causal, use_reentrant=False)
        return out, None
