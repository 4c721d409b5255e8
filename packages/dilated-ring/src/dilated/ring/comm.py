"""Transfers of the distributed strategies, with buffers from the core memory pool.

:class:`RingComm` posts one batched send/receive (``batch_isend_irecv``) so that the next block
travels while the current one is computed, exchanges head chunks all-to-all (Ulysses) and gathers
the small key padding masks. It counts the bytes it sends, which the tests compare with
:mod:`dilated.ring.costs`, and bounds every wait by its timeout: a peer that never joins makes
this rank raise :class:`TimeoutError` instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from dilated.core.memory_pool import get_default_pool
from dilated.ring.sharding import unshard

__all__ = ["PendingTransfer", "RingComm", "gather_key_padding_mask", "wait_all"]


def wait_all(works: Sequence[dist.Work], timeout_s: float | None, what: str) -> None:
    """Wait for ``works``; with ``timeout_s``, raise :class:`TimeoutError` once it has passed.

    The process group's own timeout (``init_process_group(timeout=...)``) still applies on top;
    ``timeout_s`` lets one call fail sooner. After a timeout the group is unusable (a peer is
    missing), as after any failed collective.
    """
    for work in works:
        if timeout_s is None:
            work.wait()
            continue
        try:
            work.wait(timeout=timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                raise
            raise TimeoutError(
                f"{what} did not complete within timeout_s={timeout_s} s: a peer rank never "
                "joined it (it died, hangs, or took another code path)"
            ) from exc


class PendingTransfer:
    """A posted send/receive; :meth:`wait` returns the received tensor."""

    def __init__(
        self,
        works: list[dist.Work],
        received: torch.Tensor | None,
        timeout_s: float | None = None,
    ) -> None:
        self._works = works
        self._received = received
        self._timeout_s = timeout_s

    def wait(self) -> torch.Tensor | None:
        wait_all(self._works, self._timeout_s, "a ring send/receive")
        return self._received


class RingComm:
    """Sends and receives flat blocks between ranks of ``group`` (global rank numbers).

    Attributes:
        bytes_sent, bytes_received: running totals of this process, for instrumentation.
    """

    bytes_sent: int = 0
    bytes_received: int = 0

    def __init__(
        self, group: dist.ProcessGroup | None = None, timeout_s: float | None = None
    ) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self.pool = get_default_pool()

    def exchange(
        self,
        send: torch.Tensor,
        dst: int,
        src: int,
        recv_shape: Sequence[int],
    ) -> PendingTransfer:
        """Post ``send`` to global rank ``dst`` and a receive of ``recv_shape`` from ``src``.

        The receive buffer comes from the memory pool; give it back with :meth:`release`.
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
        gradient back to its owner). Received buffers come from the pool (see :meth:`release`).
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
        (see :meth:`release`); the chunk a rank sends itself is copied, not sent.
        """
        rank = dist.get_rank(self.group)
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

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every group rank's ``tensor`` (same shape everywhere), in group-rank order.

        Counted as ``numel * element_size`` bytes sent to each of the ``P - 1`` peers.
        """
        world = dist.get_world_size(self.group)
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        work = dist.all_gather(gathered, tensor.contiguous(), group=self.group, async_op=True)
        assert work is not None
        wait_all([work], self.timeout_s, "an all-gather")
        nbytes = (world - 1) * tensor.numel() * tensor.element_size()
        RingComm.bytes_sent += nbytes
        RingComm.bytes_received += nbytes
        return gathered

    def release(self, tensor: torch.Tensor) -> None:
        """Return a received buffer to the pool."""
        self.pool.release(tensor)

    @classmethod
    def reset_counters(cls) -> None:
        """Zero :attr:`bytes_sent` and :attr:`bytes_received`."""
        cls.bytes_sent = 0
        cls.bytes_received = 0


def gather_key_padding_mask(
    mask: torch.Tensor, load_balance: str, world_size: int, comm: RingComm
) -> torch.Tensor:
    """The whole ``(batch, seq)`` key padding mask from every rank's ``(batch, seq / P)`` shard.

    One all-gather of ``batch * seq / P`` bytes per rank: tiny next to K/V.
    """
    if world_size == 1:
        return mask
    parts = comm.all_gather(mask.to(torch.uint8))
    return unshard(parts, load_balance).bool()
