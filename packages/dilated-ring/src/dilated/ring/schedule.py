"""How blocks of keys and values move between the ranks of a group, written once for both passes.

A branch whose segments span ranks is computed by a *block body* (what to compute with the blocks
in hand: [`DenseBlockBody`][dilated.ring.dense_block.DenseBlockBody] for dense attention,
dilated-sparse's block-sparse body) driven by a *schedule* (how the blocks travel: one file each
in [`dilated.ring.schedules`][dilated.ring.schedules]). A schedule is one generator,
[`Schedule.rounds`][dilated.ring.schedule.Schedule.rounds]: it posts the transfers, hands the
body the blocks of each round, and, in the backward pass, moves each block's key/value gradient
back to the block's owner. [`run_forward`][dilated.ring.schedule.run_forward] and
[`run_backward`][dilated.ring.schedule.run_backward] drive the same generator, so a schedule's
communication is written once for both passes.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from dilated.ring.transport import Transport

__all__ = ["BlockBody", "Held", "Kept", "Schedule", "run_backward", "run_forward"]

#: Copies of the received blocks by owner: filled by a forward pass, read by its backward pass.
Kept = MutableMapping[int, torch.Tensor]


@dataclass
class Held:
    """A block in hand during one round.

    Attributes:
        src: the group rank that owns it.
        block: its flat contents (what ``src``'s [`block_for`][dilated.ring.schedule.BlockBody.block_for]
            returned for this rank).
        grad: backward pass: its key/value gradient, flat like ``block`` in the body's
            ``grad_dtype``: None until the body's first ``backward`` on it, which then
            allocates it; the body adds to it after that.
    """

    src: int
    block: torch.Tensor
    grad: torch.Tensor | None = None


class BlockBody(Protocol):
    """What a schedule moves blocks for: one branch whose segments span ranks, on one rank.

    Attributes:
        rank: this rank in the group.
        members: the group ranks whose blocks this rank's queries read (this rank included),
            ascending; the ring passes blocks around them in this order.
        block_dtype, grad_dtype: dtypes of the blocks and of their gradients.
        same_block_for_every_peer: ``block_for(dst)`` is one block whatever ``dst`` (a schedule
            that forwards blocks through intermediate ranks needs it).
    """

    rank: int
    members: tuple[int, ...]
    block_dtype: torch.dtype
    grad_dtype: torch.dtype
    same_block_for_every_peer: bool

    def block_numel(self, src: int, dst: int) -> int:
        """Elements of the block ``src`` sends ``dst`` (0: none; every rank knows every pair)."""
        ...

    def block_for(self, dst: int) -> torch.Tensor:
        """The flat block this rank sends ``dst`` (``dst == rank``: the one it keeps)."""
        ...

    def forward(self, held: Sequence[Held]) -> None:
        """Merge the attention of this rank's queries over the blocks in hand into its
        accumulators."""
        ...

    def backward(self, held: Sequence[Held]) -> None:
        """Add the gradients of the blocks in hand into their ``grad`` (and this rank's query
        gradient)."""
        ...

    def add_home(self, grads: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Add the gradients of this rank's own blocks, ``(reader, gradient of the block sent to
        reader)``, into its key/value gradients."""
        ...


class Schedule:
    """How the blocks of one spanning branch travel: subclass, name it, register it in
    [`SCHEDULES`][dilated.ring.schedules].

    ``forward_sends`` and ``gradient_sends`` say, for a segment group of ``G`` ranks, how many
    blocks and block gradients one rank sends per pass (the cost model of
    [`dilated.ring.costs`][dilated.ring.costs] reads them).
    """

    name: ClassVar[str]

    def rounds(
        self, body: BlockBody, comm: Transport, *, backward: bool, kept: Kept | None = None
    ) -> Iterator[list[Held]]:
        """The rounds of one pass: each yields the blocks in hand; after the body computed them
        the schedule moves on (the next transfers are posted before a round is yielded). In the
        backward pass the schedule brings every block's gradient home and hands this rank's to
        ``body.add_home`` before it ends.

        ``kept``: None, the backward pass receives the blocks again; a mapping, the forward
        pass stores a copy of every received block in it (the transport's buffers go back to
        its pool either way) and the backward pass takes them from it instead of receiving
        them, so that it sends only gradients.
        """
        raise NotImplementedError

    def forward_sends(self, group: int) -> int:
        """Blocks one rank sends in the forward pass (the backward pass sends them again unless
        the blocks are kept)."""
        raise NotImplementedError

    def gradient_sends(self, group: int) -> int:
        """Block gradients one rank sends in the backward pass."""
        raise NotImplementedError


def run_forward(
    schedule: Schedule, body: BlockBody, comm: Transport, kept: Kept | None = None
) -> None:
    """The forward pass of one spanning branch: ``body.forward`` on every round."""
    for held in schedule.rounds(body, comm, backward=False, kept=kept):
        body.forward(held)


def run_backward(
    schedule: Schedule, body: BlockBody, comm: Transport, kept: Kept | None = None
) -> None:
    """The backward pass of one spanning branch: ``body.backward`` on every round, the
    gradients home through the same schedule."""
    for held in schedule.rounds(body, comm, backward=True, kept=kept):
        body.backward(held)
