"""Where the flash4 path's calls write: one workspace of byte regions, and its piece tables.

Each call of a [`Flash4Plan`][dilated.sparse.flash4_plan.Flash4Plan] owns a region of row-heads
(``head_dim`` values, one LSE entry). The forward workspace holds every call's output values,
then every call's LSE; the backward one every call's ``dq``, then ``dk``, then ``dv``. The piece
tables ([`dilated.kernels.piece_gather`][dilated.kernels.piece_gather]) give each piece's place
as a byte offset from the workspace's start, to which a call adds the workspace's address.

The backward workspace of every branch at once can be large (``longnet_1m`` at a million tokens,
16 heads of 128, bf16: 16 GiB, 12 of them the rate-1 branch's). Above ``BACKWARD_WORKSPACE_BYTES``
the branches go in [`BranchGroup`][dilated.sparse.flash4_workspace.BranchGroup]s, one
workspace each, in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dilated.kernels.piece_gather import ADDRESS_FIELDS, ROW_FIELDS
from dilated.sparse.flash4_plan import Flash4Call, Flash4Plan

__all__ = [
    "BACKWARD_WORKSPACE_BYTES",
    "BranchGroup",
    "backward_budget",
    "branch_groups",
    "layout_bytes",
    "piece_offsets",
]

#: The most bytes the backward pass's gradient workspace takes at once; None (default) the
#: smaller of a quarter of the device's memory and half of what is free when the backward starts
#: (free to the driver plus cached by PyTorch's allocator), rounded down to a power of two (a
#: quarter of the device's memory while a CUDA graph is captured). Above
#: it the calls run in groups of whole branches (one branch at least), each group's gradients
#: added to the result before the next group's workspace is taken. The gradients are then
#: rounded to their dtype once per group instead of once, and each group after the first reads
#: them back.
BACKWARD_WORKSPACE_BYTES: int | None = None


def _aligned(nbytes: int) -> int:
    return math.ceil(nbytes / 16) * 16


def layout_bytes(plan: Flash4Plan, head_dim: int, element_size: int) -> dict[str, int]:
    """Byte offsets of the workspace's parts: forward ``out`` values then ``lse``; backward
    ``dq``, ``dk``, ``dv``; the end of each pass's (``fwd_end``, ``bwd_end``)."""
    q_bytes = _aligned(plan.region_size * head_dim * element_size)
    kv_bytes = _aligned(plan.kv_region_size * head_dim * element_size)
    return {
        "out": 0, "lse": q_bytes, "fwd_end": q_bytes + _aligned(plan.region_size * 4),
        "dq": 0, "dk": q_bytes, "dv": q_bytes + kv_bytes, "bwd_end": q_bytes + 2 * kv_bytes,
    }  # fmt: skip


def piece_offsets(
    plan: Flash4Plan, kind: str, head_dim: int, element_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, address mask)`` of the whole plan's piece table ``kind`` (``"out"``: values
    and LSE; ``"dq"``, ``"dk"``, ``"dv"``: gradients), int64 ``(branches, rmax, batch, 2, 9)``:
    byte offsets from the workspace's start, and 1 where a workspace address is to be added."""
    at = layout_bytes(plan, head_dim, element_size)
    table = plan.piece_table(kind in ("dk", "dv"), head_dim, element_size, lse=kind == "out")
    table[..., 0] += at[kind]
    mask = torch.zeros(ROW_FIELDS, dtype=torch.int64)
    mask[list(ADDRESS_FIELDS)] = 1
    if kind == "out":
        table[..., 1] += at["lse"]
    else:
        mask[1] = 0
    # Rows of pieces that do not exist stay all zero (never read): no address there.
    exists = (table[..., 2] != 0)[..., None].to(torch.int64)
    return table, mask * exists


@dataclass(frozen=True)
class BranchGroup:
    """Consecutive branches whose backward calls share one gradient workspace.

    Attributes:
        branches: ``[first, stop)`` branch indices.
        calls: their calls, in plan order.
        regions, kv_regions: ``[first, stop)`` row-heads of their query and key/value regions
            (their workspace's first row-head is ``regions[0]``, ``kv_regions[0]``).
    """

    branches: tuple[int, int]
    calls: tuple[Flash4Call, ...]
    regions: tuple[int, int]
    kv_regions: tuple[int, int]

    @classmethod
    def of(cls, first: int, stop: int, calls: tuple[Flash4Call, ...]) -> BranchGroup:
        """The group of branches ``[first, stop)`` making ``calls``."""
        if not calls:
            return cls((first, stop), calls, (0, 0), (0, 0))
        last = calls[-1]
        return cls(
            (first, stop), calls, (calls[0].region, last.region + last.region_size),
            (calls[0].kv_region, last.kv_region + last.kv_region_size),
        )  # fmt: skip

    def layout_bytes(self, head_dim: int, element_size: int) -> dict[str, int]:
        """Byte offsets of the group's ``dq``, ``dk``, ``dv`` parts and ``bwd_end``."""
        q_bytes = _aligned((self.regions[1] - self.regions[0]) * head_dim * element_size)
        kv_bytes = _aligned((self.kv_regions[1] - self.kv_regions[0]) * head_dim * element_size)
        return {"dq": 0, "dk": q_bytes, "dv": q_bytes + kv_bytes, "bwd_end": q_bytes + 2 * kv_bytes}

    def shift(self, plan: Flash4Plan, kind: str, head_dim: int, element_size: int) -> int:
        """What turns the whole plan's offsets of ``kind`` into offsets in this group's
        workspace (0 for a group of every branch)."""
        first = self.kv_regions[0] if kind in ("dk", "dv") else self.regions[0]
        own, whole = (
            self.layout_bytes(head_dim, element_size),
            layout_bytes(plan, head_dim, element_size),
        )
        return own[kind] - whole[kind] - first * head_dim * element_size


def branch_groups(
    plan: Flash4Plan, branches: int, head_dim: int, element_size: int, budget: int
) -> list[BranchGroup]:
    """The plan's calls in groups of consecutive whole branches, each group's gradient
    workspace at most ``budget`` bytes unless it is one branch; one group when everything
    fits. The calls are in branch order ([`run_tables`][dilated.sparse.runs.run_tables])."""
    by_branch: list[tuple[Flash4Call, ...]] = [
        tuple(c for c in plan.calls if c.run.branch == i) for i in range(branches)
    ]

    def group(first: int, stop: int) -> BranchGroup:
        return BranchGroup.of(first, stop, tuple(c for b in by_branch[first:stop] for c in b))

    groups: list[BranchGroup] = []
    first = 0
    for stop in range(2, branches + 1):
        if group(first, stop).layout_bytes(head_dim, element_size)["bwd_end"] > budget:
            groups.append(group(first, stop - 1))
            first = stop - 1
    groups.append(group(first, branches))
    return groups


def backward_budget(device: torch.device) -> int:
    """The bytes a backward workspace may take on ``device`` (see
    ``BACKWARD_WORKSPACE_BYTES``)."""
    if BACKWARD_WORKSPACE_BYTES is not None:
        return BACKWARD_WORKSPACE_BYTES
    if device.type != "cuda":
        return 1 << 62
    if torch.cuda.is_current_stream_capturing():
        # A capture allocates from its graph's own pool, which the free figure does not show.
        return torch.cuda.get_device_properties(device).total_memory // 4
    # What the caller holds counts: a quarter of the card alone ran out of memory at a million
    # tokens beside 60 GB of other tensors. cudaMemGetInfo does not wait on the streams. The
    # power of two keeps the groups' cache (keyed by the budget) to a few entries.
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    budget = min(total // 4, (free + cached) // 2)
    return 1 << max(budget.bit_length() - 1, 0)
