"""flash-attn-4's block tables of one run: which kernel blocks are full, partial or empty.

A run's sub-problem has ``length`` rows; its layout says that row ``i`` may attend row ``j``
when ``table[i // B, j // B]`` (``B`` the layout's block size), and causality adds ``j <= i``.
flash-attn-4 cuts the same rows into its own blocks (``F = 128`` rows on SM90,
``BLOCK``), and each kernel block pair is

- *full* (2): every pair inside the sequence is allowed: it runs without a mask;
- *partial* (1): some are: the call's ``mask_mod`` decides each pair (the causal diagonal; a
  layout whose blocks do not align with ``F``; keys of a padded batch entry);
- *empty* (0): none is: never visited.

[`block_classes`][dilated.sparse.block_tables.block_classes] computes these classes on the CPU
from 2-D prefix sums of the layout (each kernel block is a rectangle of layout blocks), in
``O(nb^2 + (length / F)^2)``, never per pair. [`lists_of`][dilated.sparse.block_tables.lists_of]
turns them into the kernel's lists, per row of blocks ascending (the forward pass per query
block, the backward pass per key block); rows past the sequence's end are the kernel's to mask,
so a block cut by the end is full when every pair inside it is allowed. A key padding mask,
known only at the call, refines the cached lists on the device
([`refine`][dilated.sparse.block_tables.refine]): blocks whose keys are all padding drop out,
full blocks with some padding become partial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilated.kernels.flash4_block_sparse import BlockLists

__all__ = ["BlockClasses", "KeptLists", "block_classes", "key_states", "lists_of", "refine"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockClasses:
    """The classes of a run's kernel blocks.

    Attributes:
        classes: int8 ``(M, N)`` on the CPU: ``0`` empty, ``1`` partial, ``2`` full, ``M`` query
            blocks and ``N`` key blocks of ``F`` rows.
        lookup: some partial block holds both allowed and disallowed layout blocks, so the
            ``mask_mod`` must read the layout table.
    """

    classes: torch.Tensor
    lookup: bool


def _rect_sums(prefix: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, c0: torch.Tensor,
               c1: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Sums of the rectangles ``[r0, r1) x [c0, c1)`` (row vectors by column vectors) of the
    table whose zero-padded inclusive prefix sums are ``prefix``."""
    return (
        prefix[r1[:, None], c1[None, :]]
        - prefix[r0[:, None], c1[None, :]]
        - prefix[r1[:, None], c0[None, :]]
        + prefix[r0[:, None], c0[None, :]]
    )


def _prefix(table: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(table.shape[0] + 1, table.shape[1] + 1, dtype=torch.int64)
    out[1:, 1:] = table.to(torch.int64).cumsum(0).cumsum(1)
    return out


def block_classes(
    table: torch.Tensor, length: int, layout_block: int, block: int, causal: bool
) -> BlockClasses:
    """The classes of the ``F x F`` kernel blocks (``F = block``) of a run of ``length`` rows.

    Args:
        table: the branch's bool ``(nb, nb)`` layout on the CPU; its top-left
            ``ceil(length / layout_block)`` square is used (a short last segment).
        length: rows of the sub-problem (queries and keys alike).
        layout_block: rows per layout block.
        block: rows per kernel block, queries and keys.
        causal: row ``i`` sees only rows ``j <= i``.
    """
    nb = -(-length // layout_block)
    part = table[:nb, :nb].to(torch.bool)
    m = -(-length // block)
    starts = torch.arange(m) * block
    stops = torch.clamp(starts + block, max=length)
    # The layout blocks each kernel block overlaps: [first, last + 1).
    first = starts // layout_block
    last = (stops - 1) // layout_block + 1
    kept = _rect_sums(_prefix(part), first, last, first, last)
    area = (last - first)[:, None] * (last - first)[None, :]
    classes = torch.where(kept == area, FULL, PARTIAL)
    classes = torch.where(kept == 0, EMPTY, classes)
    mixed = (kept > 0) & (kept < area)
    if causal:
        rows = torch.arange(m)
        above = rows[None, :] > rows[:, None]
        classes = torch.where(above, EMPTY, classes)
        # A diagonal block holds an allowed pair iff its rectangle's lower triangle of layout
        # blocks (key block <= query block, each holding some j <= i) holds a True.
        lower = _rect_sums(_prefix(part.tril()), first, last, first, last).diagonal()
        diag = torch.where(lower > 0, PARTIAL if block > 1 else FULL, EMPTY)
        classes[rows, rows] = diag
    classes = classes.to(torch.int8)
    return BlockClasses(classes, bool(((classes == PARTIAL) & mixed).any()))


@dataclass(frozen=True)
class KeptLists:
    """Every non-empty block of each row of blocks, ascending, with its class: what
    [`refine`][dilated.sparse.block_tables.refine] starts from.

    Attributes:
        idx: int32 ``(rows, width)``, the blocks (padded with 0 past ``cnt``).
        cls: int8 ``(rows, width)``, their classes (0 past ``cnt``).
        cnt: int32 ``(rows,)``.
    """

    idx: torch.Tensor
    cls: torch.Tensor
    cnt: torch.Tensor

    def to(self, device: torch.device) -> KeptLists:
        """A copy on ``device`` (asynchronous from pinned memory on CUDA)."""
        return KeptLists(*(_upload(t, device) for t in (self.idx, self.cls, self.cnt)))


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    from dilated.kernels._tables import upload

    return upload(t, device)


def kept_lists(classes: torch.Tensor) -> KeptLists:
    """The [`KeptLists`][dilated.sparse.block_tables.KeptLists] of each row of ``classes``
    (``(rows, cols)`` int8; rows are the table's rows: transpose it for the backward pass)."""
    kept = classes > 0
    cnt = kept.sum(-1, dtype=torch.int32)
    width = max(1, int(cnt.max())) if cnt.numel() else 1
    # A stable sort of "not kept" puts the kept columns first, ascending.
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    valid = torch.arange(width)[None, :] < cnt[:, None]
    idx = torch.where(valid, order, 0).to(torch.int32)
    cls = torch.where(valid, classes.gather(-1, order), 0).to(torch.int8)
    return KeptLists(idx, cls, cnt)


def refine(
    kept: KeptLists, states: torch.Tensor, rows_are_keys: bool, block: tuple[int, int]
) -> BlockLists:
    """The kernel's lists of ``kept`` under a key padding mask, on ``kept``'s device.

    Args:
        kept: one pass's [`KeptLists`][dilated.sparse.block_tables.KeptLists].
        states: int8 ``(batch, heads | 1, N)`` per key block: 0 every key padding, 1 some, 2
            none ([`key_states`][dilated.sparse.block_tables.key_states]); or ``(1, 1, N)`` of 2s
            for a call without padding.
        rows_are_keys: the lists' rows are key blocks (the backward pass); else their entries
            are (the forward pass).
        block: ``(query rows, key rows)`` per block.

    Returns:
        [`BlockLists`][dilated.kernels.flash4_block_sparse.BlockLists] ``(batch, heads | 1,
        rows[, width])``: a block drops out where its keys are all padding, a full block with
        some padding becomes partial.
    """
    # Forward: each entry's key block, (b, h, rows, width); backward: each row's own.
    at = states[..., :, None] if rows_are_keys else states[..., kept.idx.long()]
    valid = torch.arange(kept.idx.shape[1], device=kept.idx.device) < kept.cnt[:, None]
    cls = torch.where(at == FULL, kept.cls, torch.clamp(kept.cls, max=PARTIAL))
    cls = torch.where(valid & (at > EMPTY), cls, EMPTY)
    lists = []
    for which in (PARTIAL, FULL):
        sel = cls == which
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices
        idx = kept.idx.expand(sel.shape).gather(-1, order)
        lists.append((sel.sum(-1, dtype=torch.int32), idx.to(torch.int32).contiguous()))
    (mask_cnt, mask_idx), (full_cnt, full_idx) = lists
    return BlockLists(mask_cnt, mask_idx, full_cnt, full_idx, block)


def lists_of(
    classes: torch.Tensor, backward: bool, device: torch.device, block: tuple[int, int]
) -> BlockLists:
    """The kernel's lists ``(1, 1, rows[, width])`` of ``classes`` (blocks of ``block`` rows)
    without padding, on ``device``: per query block (forward) or per key block (``backward``)."""
    kept = kept_lists(classes.t().contiguous() if backward else classes)
    full = torch.full((1, 1, classes.shape[1]), FULL, dtype=torch.int8)
    lists = refine(kept, full, backward, block)
    return BlockLists(
        _upload(lists.mask_cnt, device),
        _upload(lists.mask_idx, device),
        _upload(lists.full_cnt, device),
        _upload(lists.full_idx, device),
        block,
    )


def key_states(keep: torch.Tensor, block: int) -> torch.Tensor:
    """int8 ``(batch, heads, ceil(rows / block))`` of a bool key mask ``keep`` ``(batch, heads,
    rows)`` (True = a key that may be attended): per key block, 0 when every key is padding, 2
    when none is, 1 otherwise (rows past the end count for neither)."""
    b, h, rows = keep.shape
    n = -(-rows // block)
    pad = n * block - rows
    some = torch.nn.functional.pad(keep, (0, pad), value=False).view(b, h, n, block).any(-1)
    every = torch.nn.functional.pad(keep, (0, pad), value=True).view(b, h, n, block).all(-1)
    return (some.to(torch.int8) + every.to(torch.int8)).contiguous()
