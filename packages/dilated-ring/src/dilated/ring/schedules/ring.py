"""The ring schedule: blocks rotate between neighbours, one in hand per round.

Member ``i`` of a segment group of ``G`` ranks sends its block to member ``i + 1`` and receives
member ``i - 1``'s, ``G - 1`` times; the next transfer is posted before the current block is
computed, so it travels during the compute. In the backward pass each block carries its
gradient, which every rank adds to before passing it on with the block; after a full turn
(``G`` gradient transfers) the gradient of a rank's own block is home. One block and one
gradient are in hand at a time, whatever ``G``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dilated.ring.schedule import BlockBody, Held, Kept, Schedule
from dilated.ring.transport import Transport

__all__ = ["RingSchedule"]


class RingSchedule(Schedule):
    """Blocks around the members of the group, the gradients with them."""

    name = "ring"

    def rounds(
        self, body: BlockBody, comm: Transport, *, backward: bool, kept: Kept | None = None
    ) -> Iterator[list[Held]]:
        if not body.same_block_for_every_peer:
            raise ValueError("the ring schedule forwards blocks: each must suit every reader")
        members, rank = body.members, body.rank
        size, index = len(members), members.index(rank)
        nxt = comm.peer(members[(index + 1) % size])
        prev = comm.peer(members[(index - 1) % size])

        def source(step: int) -> int:
            return members[(index - step) % size]

        def numel(step: int) -> tuple[int]:
            return (body.block_numel(source(step), rank),)

        reuse = backward and kept is not None
        own = body.block_for(rank)
        block, grad = own, None
        for step in range(size):
            src = source(step)
            if reuse:
                assert kept is not None
                block = own if src == rank else kept[src]
            pending = None
            if step + 1 < size and not reuse:
                pending = comm.exchange(block, nxt, prev, numel(step + 1))
            held = Held(src, block, grad)
            yield [held]
            if backward:
                grad = held.grad
                assert grad is not None
                if size > 1:
                    # The gradient moves on with its block; after a full turn it is home.
                    moved = comm.exchange(grad, nxt, prev, numel(step + 1)).wait()
                    if step > 0:
                        comm.release(grad)
                    grad = moved
            if pending is not None:
                received = pending.wait()
                if kept is not None:
                    kept[source(step + 1)] = received.clone()
                if block is not own:
                    comm.release(block)
                block = received
        if block is not own and not reuse:
            comm.release(block)
        if backward:
            assert isinstance(grad, torch.Tensor)
            body.add_home([(rank, grad)])
            if size > 1:
                comm.release(grad)

    def forward_sends(self, group: int) -> int:
        return group - 1

    def gradient_sends(self, group: int) -> int:
        return group if group > 1 else 0
