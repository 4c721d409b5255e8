"""Transfers of the distributed strategies, with buffers from the core memory pool.

Every strategy talks through a [`Transport`][dilated.ring.transport.Transport]: one posted
send/receive (so that the next block travels while the current one is computed), many at once
(all-gather strategy), all-to-all over heads (Ulysses) and an all-gather of small tensors (the
cross-rank check, key padding masks). [`RingComm`][dilated.ring.comm.RingComm] implements it
over ``torch.distributed`` (``batch_isend_irecv``); [`dilated.ring.loopback`][dilated.ring.loopback]
over threads of one process, which is how every rank of a ring can run on one device. Both count
the bytes they send, which the tests compare with [`dilated.ring.costs`][dilated.ring.costs],
and bound every wait by a timeout: a peer that never joins makes this rank raise
[`TimeoutError`][TimeoutError] instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from dilated.ring.loopback import LoopbackComm, LoopbackGroup
from dilated.ring.sharding import unshard
from dilated.ring.transport import PendingTransfer, Transport, wait_all

__all__ = [
    "PendingTransfer",
    "RingComm",
    "Transport",
    "gather_key_padding_mask",
    "group_key",
    "make_comm",
    "resolve_group",
    "wait_all",
]


class RingComm(Transport):
    """[`Transport`][dilated.ring.transport.Transport] over the ranks of a ``torch.distributed``
    ``group`` (addresses are global rank numbers).

    Attributes:
        bytes_sent, bytes_received: running totals of this process, for instrumentation.
    """

    bytes_sent: int = 0
    bytes_received: int = 0

    def __init__(
        self, group: dist.ProcessGroup | None = None, timeout_s: float | None = None
    ) -> None:
        super().__init__(timeout_s)
        self.group = group
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialised else 0
        self.world_size = dist.get_world_size(group) if initialised else 1

    def peer(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def device_for(self, like: object) -> torch.device:
        # NCCL exchanges device tensors only; gloo takes CPU tensors.
        if (
            isinstance(like, torch.Tensor)
            and like.is_cuda
            and dist.get_backend(self.group) == "nccl"
        ):
            return like.device
        return torch.device("cpu")

    def exchange(
        self,
        send: torch.Tensor,
        dst: int,
        src: int,
        recv_shape: Sequence[int],
    ) -> PendingTransfer:
        """Post ``send`` to global rank ``dst`` and a receive of ``recv_shape`` from ``src``.

        The receive buffer comes from the memory pool; give it back with [`release`][dilated.ring.transport.Transport.release].
        """
        recv = self.pool.acquire(recv_shape, send.dtype, send.device)
        ops = [
            dist.P2POp(dist.isend, send.contiguous(), dst, self.group),
            dist.P2POp(dist.irecv, recv, src, self.group),
        ]
        works = dist.batch_isend_irecv(ops)
        RingComm.bytes_sent += send.numel() * send.element_size()
        RingComm.bytes_received += recv.numel() * recv.element_size()
        return PendingTransfer(works, recv, self.timeout_s)

    def exchange_many(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[Sequence[int], torch.dtype, int]],
    ) -> list[torch.Tensor]:
        """Send each ``(tensor, dst)`` and receive each ``(shape, dtype, src)``; wait for all.

        Used by the all-gather strategy (one block to every peer of a group, and each peer's
        gradient back to its owner). Received buffers come from the pool (see [`release`][dilated.ring.transport.Transport.release]).
        """
        device = sends[0][0].device if sends else torch.device("cpu")
        received = [self.pool.acquire(shape, dtype, device) for shape, dtype, _ in recvs]
        ops = [dist.P2POp(dist.isend, t.contiguous(), dst, self.group) for t, dst in sends]
        ops += [
            dist.P2POp(dist.irecv, buf, src, self.group)
            for buf, (_, _, src) in zip(received, recvs)
        ]
        if ops:
            wait_all(dist.batch_isend_irecv(ops), self.timeout_s, "an all-gather exchange")
        RingComm.bytes_sent += sum(t.numel() * t.element_size() for t, _ in sends)
        RingComm.bytes_received += sum(t.numel() * t.element_size() for t in received)
        return received

    def all_to_all(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``chunks[i]`` to group rank ``i``; return the chunk received from each rank.

        Every rank's chunk ``i`` has the same shape as the chunk that rank ``i`` sends here
        (the Ulysses exchange keeps shapes symmetric). Received buffers come from the pool
        (see [`release`][dilated.ring.transport.Transport.release]); the chunk a rank sends itself is copied, not sent.
        """
        rank = self.rank
        received = [self.pool.acquire(c.shape, c.dtype, c.device) for c in chunks]
        work = dist.all_to_all(
            received, [c.contiguous() for c in chunks], group=self.group, async_op=True
        )
        assert work is not None
        wait_all([work], self.timeout_s, "an all-to-all over heads")
        sent = sum(c.numel() * c.element_size() for i, c in enumerate(chunks) if i != rank)
        RingComm.bytes_sent += sent
        RingComm.bytes_received += sent
        return received

    def all_gather(self, tensor: torch.Tensor, *, counted: bool = True) -> list[torch.Tensor]:
        """Every group rank's ``tensor`` (same shape everywhere), in group-rank order.

        Counted (unless ``counted=False``) as ``numel * element_size`` bytes sent to each of the ``P - 1`` peers.
        """
        world = self.world_size
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        work = dist.all_gather(gathered, tensor.contiguous(), group=self.group, async_op=True)
        assert work is not None
        wait_all([work], self.timeout_s, "an all-gather")
        nbytes = (world - 1) * tensor.numel() * tensor.element_size() if counted else 0
        RingComm.bytes_sent += nbytes
        RingComm.bytes_received += nbytes
        return gathered

    @classmethod
    def reset_counters(cls) -> None:
        """Zero the ``bytes_sent`` and ``bytes_received`` counters."""
        cls.bytes_sent = 0
        cls.bytes_received = 0


def make_comm(group: object, timeout_s: float | None) -> Transport:
    """The transport of ``group``: a ``torch.distributed`` process group (None: the default
    group, or a world of one without one) or a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]."""

    if isinstance(group, LoopbackGroup):
        return LoopbackComm(group, timeout_s)
    return RingComm(group, timeout_s)  # type: ignore[arg-type]


def group_key(group: object) -> str:
    """A string naming ``group``, for arguments of custom ops (which take no Python objects).

    ``""`` is the default group (or a world of one), a process group's key is its registered
    ``group_name``, and a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]'s its
    ``key``; [`resolve_group`][dilated.ring.comm.resolve_group] maps it back.
    """

    if group is None:
        return ""
    if isinstance(group, LoopbackGroup):
        return group.key
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise TypeError(
            f"group must be None, a torch.distributed ProcessGroup or a LoopbackGroup, got "
            f"{type(group).__name__}"
        )
    return name


def resolve_group(key: str) -> object:
    """The group named by [`group_key`][dilated.ring.comm.group_key]."""

    if key == "":
        return None
    if key.startswith(LoopbackGroup.PREFIX):
        return LoopbackGroup.lookup(key)
    # The registry torch's own functional collectives resolve group names with.
    from torch.distributed import distributed_c10d

    return distributed_c10d._resolve_process_group(key)  # type: ignore[attr-defined,arg-type]


def gather_key_padding_mask(
    mask: torch.Tensor, load_balance: str, world_size: int, comm: Transport
) -> torch.Tensor:
    """The whole ``(batch, seq)`` key padding mask from every rank's ``(batch, seq / P)`` shard.

    One all-gather of ``batch * seq / P`` bytes per rank: tiny next to K/V.
    """
    if world_size == 1:
        return mask
    parts = comm.all_gather(mask.to(torch.uint8))
    return unshard(parts, load_balance).bool()
