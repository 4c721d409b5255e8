"""The all-gather schedule (LongNet's): every block of the group in hand at once.

Each rank sends its block to every member that reads it and receives theirs in one exchange,
and the body computes them all in one round (the dense body joins the blocks of contiguous
shards into one key range). In the backward pass each block's gradient goes straight back to
its owner, which sums the gradients of its own block from every reader (a reduce-scatter).
"""

from __future__ import annotations

from collections.abc import Iterator

from dilated.ring.schedule import BlockBody, Held, Kept, Schedule
from dilated.ring.transport import Transport

__all__ = ["AllGatherSchedule"]


class AllGatherSchedule(Schedule):
    """One exchange of every block, one round, a reduce-scatter of the gradients."""

    name = "allgather"

    def rounds(
        self, body: BlockBody, comm: Transport, *, backward: bool, kept: Kept | None = None
    ) -> Iterator[list[Held]]:
        rank = body.rank
        peers = [m for m in body.members if m != rank]
        sources = [src for src in peers if body.block_numel(src, rank)]
        readers = [dst for dst in peers if body.block_numel(rank, dst)]
        if backward and kept is not None:
            received = [kept[src] for src in sources]
        else:
            sends = [(body.block_for(dst), comm.peer(dst)) for dst in readers]
            recvs = [
                ((body.block_numel(src, rank),), body.block_dtype, comm.peer(src))
                for src in sources
            ]
            received = comm.exchange_many(sends, recvs)
            if kept is not None:
                kept.update((src, t.clone()) for src, t in zip(sources, received))
        held = [Held(src, block) for src, block in zip(sources, received)]
        if body.block_numel(rank, rank):
            held.insert(0, Held(rank, body.block_for(rank)))
        yield held
        if backward:
            grads = {h.src: h.grad for h in held if h.grad is not None}
            sends = [(grads[src], comm.peer(src)) for src in sources]
            recvs = [
                ((body.block_numel(rank, dst),), body.grad_dtype, comm.peer(dst)) for dst in readers
            ]
            returned = comm.exchange_many(sends, recvs)
            own = [(rank, grads[rank])] if rank in grads else []
            body.add_home([*own, *zip(readers, returned)])
            for t in returned:
                comm.release(t)
        if not (backward and kept is not None):
            for block in received:
                comm.release(block)

    def forward_sends(self, group: int) -> int:
        return group - 1

    def gradient_sends(self, group: int) -> int:
        return group - 1
