"""The interface every transfer of the distributed strategies goes through, with one
implementation over ``torch.distributed`` ([`RingComm`][dilated.ring.comm.RingComm]) and one
over threads of one process ([`LoopbackComm`][dilated.ring.loopback.LoopbackComm]): a posted
send/receive, many at once, all-to-all and all-gather, every wait bounded by a timeout."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from dilated.core.memory_pool import get_default_pool

__all__ = ["PendingTransfer", "Transport", "wait_all"]


def wait_all(works: Sequence[dist.Work], timeout_s: float | None, what: str) -> None:
    """Wait for ``works``; with ``timeout_s``, raise `TimeoutError` once it has passed.

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
    """A posted send/receive; [`wait`][dilated.ring.transport.PendingTransfer.wait] returns the
    received tensor (subclassed by other transports)."""

    def __init__(
        self,
        works: list[dist.Work],
        received: torch.Tensor,
        timeout_s: float | None = None,
    ) -> None:
        self._works = works
        self._received = received
        self._timeout_s = timeout_s

    def wait(self) -> torch.Tensor:
        """Block until the transfer is complete; the received tensor."""
        wait_all(self._works, self._timeout_s, "a ring send/receive")
        return self._received


class Transport:
    """What the strategies need from a group of ranks (``torch.distributed`` or in-process).

    Attributes:
        rank, world_size: this rank in the group and the group's size.
        timeout_s: bound of every wait (None: the backend's own).
        pool: where received buffers come from (give them back with
            [`release`][dilated.ring.transport.Transport.release]).
    """

    rank: int
    world_size: int
    timeout_s: float | None

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.pool = get_default_pool()

    def peer(self, group_rank: int) -> int:
        """The address of group rank ``group_rank`` for ``dst``/``src`` arguments."""
        raise NotImplementedError

    def device_for(self, like: object) -> torch.device:
        """Where small exchanged tensors (metadata, masks) live for inputs like ``like``."""
        return torch.device("cpu")

    def exchange(
        self, send: torch.Tensor, dst: int, src: int, recv_shape: Sequence[int]
    ) -> PendingTransfer:
        """Post ``send`` to ``dst`` and a receive of ``recv_shape`` (dtype of ``send``) from
        ``src``; the receive buffer comes from the pool."""
        raise NotImplementedError

    def exchange_many(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[Sequence[int], torch.dtype, int]],
    ) -> list[torch.Tensor]:
        """Send each ``(tensor, dst)`` and receive each ``(shape, dtype, src)``; wait for all."""
        raise NotImplementedError

    def all_to_all(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``chunks[i]`` to group rank ``i``; the chunk received from each rank."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor, *, counted: bool = True) -> list[torch.Tensor]:
        """Every group rank's ``tensor`` (same shape everywhere), in group-rank order.

        ``counted=False`` keeps the transfer out of the byte counters (the cross-rank check's
        metadata, which [`dilated.ring.costs`][dilated.ring.costs] does not model)."""
        raise NotImplementedError

    def release(self, tensor: torch.Tensor) -> None:
        """Return a received buffer to the pool."""
        self.pool.release(tensor)
