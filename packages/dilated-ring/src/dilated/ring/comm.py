"""Point-to-point transfers of the ring, with buffers from the core memory pool.

:class:`RingComm` posts one batched send/receive (``batch_isend_irecv``) so that the next block
travels while the current one is computed, and counts the bytes it sends, which the tests compare
with :mod:`dilated.ring.costs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from dilated.core.memory_pool import get_default_pool

__all__ = ["PendingTransfer", "RingComm"]


class PendingTransfer:
    """A posted send/receive; :meth:`wait` returns the received tensor."""

    def __init__(self, works: list[dist.Work], received: torch.Tensor | None) -> None:
        self._works = works
        self._received = received

    def wait(self) -> torch.Tensor | None:
        for w in self._works:
            w.wait()
        return self._received


class RingComm:
    """Sends and receives flat blocks between ranks of ``group`` (global rank numbers).

    Attributes:
        bytes_sent, bytes_received: running totals of this process, for instrumentation.
    """

    bytes_sent: int = 0
    bytes_received: int = 0

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
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
        return PendingTransfer(works, recv)

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
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        RingComm.bytes_sent += sum(t.numel() * t.element_size() for t, _ in sends)
        RingComm.bytes_received += sum(t.numel() * t.element_size() for t in received)
        return received

    def release(self, tensor: torch.Tensor) -> None:
        """Return a received buffer to the pool."""
        self.pool.release(tensor)

    @classmethod
    def reset_counters(cls) -> None:
        """Zero :attr:`bytes_sent` and :attr:`bytes_received`."""
        cls.bytes_sent = 0
        cls.bytes_received = 0
