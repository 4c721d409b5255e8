"""What one call of the ring and all-gather strategies is, apart from its tensors: the plan.

A [`RingPlan`][dilated.ring.plan.RingPlan] is identical on every rank but for ``rank``. Its
[`geometry`][dilated.ring.plan.RingPlan.geometry] is the part every piece of host work depends
on (the sharding, the heads, the causal flag): the branch groups of
[`spanning_branch`][dilated.ring.plan.spanning_branch] are computed once per geometry and
branch, and so are the dense calls of [`dilated.ring.dense_block`][dilated.ring.dense_block].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dilated.core.caching import plan_cache
from dilated.core.reference import derive_dropout_seed
from dilated.ring.layout import PhaseLayout, branch_members, is_local, phase_layouts

__all__ = ["RingPlan", "ShardGeometry", "SpanningBranch", "spanning_branch"]


@dataclass(frozen=True)
class ShardGeometry:
    """The sharding of one call as this rank sees it: ``world_size`` shards of a ``seq``-token
    sequence split as ``load_balance`` says, ``heads`` query and ``kv_heads`` key/value heads."""

    seq: int
    world_size: int
    load_balance: str
    rank: int
    heads: int
    kv_heads: int
    is_causal: bool

    @property
    def shard(self) -> int:
        """Tokens each rank holds."""
        return self.seq // self.world_size


@dataclass(frozen=True)
class RingPlan:
    """Everything about one call that is not a tensor (identical on every rank but ``rank``).

    ``group``: the process group (or a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]);
    ``strategy``: the name of its schedule in
    [`SCHEDULES`][dilated.ring.schedules]; ``dropout_seed``: the seed of this call's
    dropout masks (None without dropout).
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    scale: float
    is_causal: bool
    load_balance: str
    group: Any
    rank: int
    world_size: int
    seq: int
    heads: int
    kv_heads: int
    strategy: str = "ring"
    timeout_s: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None

    @property
    def geometry(self) -> ShardGeometry:
        """The key of this rank's cached host work."""
        return ShardGeometry(
            self.seq, self.world_size, self.load_balance, self.rank, self.heads, self.kv_heads,
            self.is_causal,
        )  # fmt: skip

    def local_branches(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(w_i, r_i)`` of the branches computed on the shard alone."""
        pairs = [
            (w, r)
            for w, r in zip(self.segment_lengths, self.dilation_rates)
            if is_local(self.seq, self.world_size, self.load_balance, w)
        ]
        return tuple(w for w, _ in pairs), tuple(r for _, r in pairs)

    def spanning_branches(self) -> list[SpanningBranch]:
        """The branches whose segments span ranks, in branch order."""
        return [
            spanning_branch(self.geometry, i, w, r)
            for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates))
            if not is_local(self.seq, self.world_size, self.load_balance, w)
        ]

    def with_seed(self, seed: int) -> RingPlan:
        """This plan with the dropout seed of one call."""
        return replace(self, dropout_seed=seed)

    def seed(self, *call: int) -> int | None:
        """The dropout seed of one dense call, from this rank and the call's coordinates (the
        same in both passes, different on every rank even when all ranks drew one seed)."""
        return derive_dropout_seed(self.dropout_seed, self.rank, *call)


@dataclass(frozen=True)
class SpanningBranch:
    """One branch whose segments span ranks, on one rank.

    Attributes:
        index: the branch's position in the call's branch list.
        w, r: its segment length and dilation rate.
        geometry: the sharding.
        members: the group ranks whose keys this rank's queries read in it (this rank
            included), ascending: a schedule moves their blocks.
        layouts: each member's phase layouts (what its block holds), by member.
    """

    index: int
    w: int
    r: int
    geometry: ShardGeometry
    members: tuple[int, ...]
    # Derived from the fields above: left out of comparisons and the hash.
    layouts: dict[int, tuple[PhaseLayout, ...]] = field(compare=False)

    @property
    def mine(self) -> tuple[PhaseLayout, ...]:
        """This rank's phase layouts (of its queries and of its own block)."""
        return self.layouts[self.geometry.rank]


@plan_cache("dilated.ring.plan.spanning_branch", maxsize=1024, key="(shard geometry, index, w, r)")
def spanning_branch(geometry: ShardGeometry, index: int, w: int, r: int) -> SpanningBranch:
    """The [`SpanningBranch`][dilated.ring.plan.SpanningBranch] of branch ``index`` ``(w, r)``,
    computed once per ``(geometry, index, w, r)`` (the cache's key)."""
    g = geometry
    members = tuple(branch_members(g.seq, g.world_size, g.load_balance, w, g.rank))
    layouts = {
        m: phase_layouts(g.seq, g.world_size, g.load_balance, m, w, r, g.heads, g.kv_heads)
        for m in members
    }
    return SpanningBranch(index, w, r, g, members, layouts)
