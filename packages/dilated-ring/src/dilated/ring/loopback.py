"""Every rank of a ring in one process: an in-memory transport between threads.

``LoopbackHub(P)`` stands for a group of ``P`` ranks; ``hub.group(i)`` is the ``group`` argument
rank ``i`` passes to [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention] or
a module, from its own thread. Blocks are handed over in memory (copied, as a real transfer
copies them into the peer's buffer) and counted per rank, so the strategies run unchanged with
their real per-rank compute and their real bytes. Uses: testing many ranks without process
start-up, and `benchmarks/ring.py --simulate P`, which runs the ranks of a ring on one GPU.

Every rank must run in its own thread (a send waits for nothing, a receive waits for its peer);
[`run_ranks`][dilated.ring.loopback.run_ranks] does that and re-raises the first failure.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from dilated.ring.transport import PendingTransfer, Transport

__all__ = ["LoopbackComm", "LoopbackGroup", "LoopbackHub", "run_ranks"]

T = TypeVar("T")


class _Channel:
    """Messages from one rank to another, numbered in sending order.

    A receive takes its number when it is posted, not when it is waited on, so two receives
    posted in one order and waited on in the other still get the messages in posting order
    (as ``torch.distributed`` matches them).
    """

    def __init__(self) -> None:
        self.messages: dict[int, torch.Tensor] = {}
        self.sent = 0
        self.posted = 0
        self.arrived = threading.Condition()


class LoopbackHub:
    """The channels of a group of ``world_size`` in-process ranks, one per ordered pair.

    Args:
        world_size: ranks in the group.
        live: the ranks that run (default: all). The others are *phantom peers*: what is sent
            to them is counted and dropped, a receive from one returns a random tensor of the
            expected shape and dtype (one cached buffer per shape), and in an all-gather it
            holds what this rank holds (so the cross-rank check agrees). With one live rank, that
            rank's compute and bytes are exactly those of a real run, measured alone on the
            device; only the values it receives are not its peers' (timing and byte counts, not
            results).

    Attributes:
        bytes_sent: bytes each rank has sent (index = rank), for instrumentation.
    """

    def __init__(self, world_size: int, *, live: Sequence[int] | None = None) -> None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        self.world_size = world_size
        self.live = frozenset(range(world_size) if live is None else live)
        if not self.live or not self.live <= set(range(world_size)):
            raise ValueError(
                f"live must be a non-empty set of ranks in [0, {world_size}), got {live!r}"
            )
        self._channels = {(a, b): _Channel() for a in range(world_size) for b in range(world_size)}
        self._phantoms: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
        self.bytes_sent = [0] * world_size

    def phantom(self, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        """What a phantom peer "sends": a cached random tensor shaped like ``like``."""
        key = (tuple(like.shape), like.dtype, device)
        if key not in self._phantoms:
            if like.dtype.is_floating_point:
                self._phantoms[key] = torch.randn(key[0], dtype=like.dtype, device=device)
            else:
                self._phantoms[key] = torch.ones(key[0], dtype=like.dtype, device=device)
        return self._phantoms[key]

    def group(self, rank: int) -> LoopbackGroup:
        """The ``group`` argument of rank ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return LoopbackGroup(self, rank)

    def put(self, src: int, dst: int, tensor: torch.Tensor, *, counted: bool = True) -> None:
        if counted:
            self.bytes_sent[src] += tensor.numel() * tensor.element_size()
        if dst not in self.live:
            return
        channel = self._channels[(src, dst)]
        with channel.arrived:
            channel.messages[channel.sent] = tensor.detach().clone()
            channel.sent += 1
            channel.arrived.notify_all()

    def post(self, src: int, dst: int) -> int:
        """Reserve the number of the next message from ``src`` to ``dst``."""
        channel = self._channels[(src, dst)]
        with channel.arrived:
            ticket = channel.posted
            channel.posted += 1
        return ticket

    def take(
        self, src: int, dst: int, ticket: int, timeout_s: float | None, what: str
    ) -> torch.Tensor:
        channel = self._channels[(src, dst)]
        with channel.arrived:
            if not channel.arrived.wait_for(lambda: ticket in channel.messages, timeout_s):
                raise TimeoutError(
                    f"{what} from rank {src} did not complete within timeout_s={timeout_s} s: "
                    "the peer never sent it (it failed, or took another code path)"
                )
            return channel.messages.pop(ticket)


class LoopbackGroup:
    """One rank's handle on a [`LoopbackHub`][dilated.ring.loopback.LoopbackHub].

    ``key`` names it in custom-op arguments ([`dilated.ring.comm.group_key`][dilated.ring.comm.group_key]).
    """

    PREFIX: ClassVar[str] = "loopback:"
    _live: ClassVar[weakref.WeakValueDictionary[str, LoopbackGroup]] = weakref.WeakValueDictionary()
    _serial: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(self, hub: LoopbackHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.key = f"{self.PREFIX}{next(self._serial)}"
        LoopbackGroup._live[self.key] = self

    @classmethod
    def lookup(cls, key: str) -> LoopbackGroup:
        """The live group of ``key``."""
        group = cls._live.get(key)
        if group is None:
            raise ValueError(f"no live LoopbackGroup has key {key!r}")
        return group


class _Received(PendingTransfer):
    def __init__(self, fetch: Callable[[], torch.Tensor]) -> None:
        super().__init__([], torch.empty(0))
        self._fetch = fetch

    def wait(self) -> torch.Tensor:
        return self._fetch()


class LoopbackComm(Transport):
    """[`Transport`][dilated.ring.transport.Transport] of one in-process rank (addresses are ranks).

    A receive waits at most ``timeout_s`` (default 60 s), so a failed peer never hangs the others.
    """

    def __init__(self, group: LoopbackGroup, timeout_s: float | None = None) -> None:
        super().__init__(60.0 if timeout_s is None else timeout_s)
        self.group = group
        self.hub = group.hub
        self.rank = group.rank
        self.world_size = group.world_size

    def peer(self, group_rank: int) -> int:
        return group_rank

    def _receive(
        self, src: int, like: torch.Tensor, device: torch.device, what: str
    ) -> torch.Tensor:
        return self._finish(src, self.hub.post(src, self.rank), like, device, what)

    def _finish(
        self, src: int, ticket: int, like: torch.Tensor, device: torch.device, what: str
    ) -> torch.Tensor:
        if src not in self.hub.live:
            return self.hub.phantom(like, device)
        got = self.hub.take(src, self.rank, ticket, self.timeout_s, what)
        if got.shape != like.shape or got.dtype != like.dtype:
            raise RuntimeError(
                f"rank {self.rank} expected {tuple(like.shape)} {like.dtype} from rank {src}, "
                f"got {tuple(got.shape)} {got.dtype}"
            )
        return got

    def exchange(
        self, send: torch.Tensor, dst: int, src: int, recv_shape: Sequence[int]
    ) -> PendingTransfer:
        self.hub.put(self.rank, dst, send)
        like = torch.empty(tuple(recv_shape), dtype=send.dtype, device="meta")
        ticket = self.hub.post(src, self.rank)
        return _Received(
            lambda: self._finish(src, ticket, like, send.device, "a ring send/receive")
        )

    def exchange_many(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[Sequence[int], torch.dtype, int]],
    ) -> list[torch.Tensor]:
        device = sends[0][0].device if sends else torch.device("cpu")
        for tensor, dst in sends:
            self.hub.put(self.rank, dst, tensor)
        return [
            self._receive(
                src,
                torch.empty(tuple(shape), dtype=dtype, device="meta"),
                device,
                "an all-gather exchange",
            )
            for shape, dtype, src in recvs
        ]

    def all_to_all(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for dst, chunk in enumerate(chunks):
            if dst != self.rank:
                self.hub.put(self.rank, dst, chunk)
        return [
            chunk.clone()
            if src == self.rank
            else self._receive(src, chunk, chunk.device, "an all-to-all")
            for src, chunk in enumerate(chunks)
        ]

    def all_gather(self, tensor: torch.Tensor, *, counted: bool = True) -> list[torch.Tensor]:
        for dst in range(self.world_size):
            if dst != self.rank:
                self.hub.put(self.rank, dst, tensor, counted=counted)
        # A phantom peer holds what this rank holds (so the cross-rank check agrees).
        return [
            tensor.clone()
            if src == self.rank or src not in self.hub.live
            else self._receive(src, tensor, tensor.device, "an all-gather")
            for src in range(self.world_size)
        ]

    def release(self, tensor: torch.Tensor) -> None:
        # Received tensors are the hub's copies, not pool buffers: nothing to give back.
        del tensor


def run_ranks(
    fn: Callable[[int, LoopbackGroup], T], world_size: int, *, timeout_s: float = 600.0
) -> list[T]:
    """Run ``fn(rank, group)`` for every rank of a new hub, each in its own thread.

    Returns the results in rank order; re-raises the first exception a rank raised (the other
    ranks then fail on their receive's timeout, or finish).
    """
    hub = LoopbackHub(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, hub.group(rank))
        except BaseException as exc:  # re-raised in the caller's thread
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        if t.is_alive():
            raise TimeoutError(f"a loopback rank did not finish within {timeout_s} s")
    for exc in errors:
        if exc is not None:
            raise exc
    return results
