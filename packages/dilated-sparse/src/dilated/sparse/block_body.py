"""The block-sparse block body: a rank's query tiles against the key/value rows their layout needs.

For a branch whose segment spans ranks (contiguous shards of ``S`` positions, ``S`` a multiple of
``r B``), a rank's queries of it are whole blocks ``[a0, a0 + S / (r B))`` of one segment's
sub-problem; the layout says which key blocks they read. Each rank sends every other rank
exactly those rows of its K/V (the phase's rows of the key/value heads the phase's query heads
read): the blocks of [`BlockSparseBody`][dilated.sparse.block_body.BlockSparseBody] differ per
reader, so it runs on dilated-ring's all-gather schedule
([`AllGatherSchedule`][dilated.ring.schedules.allgather.AllGatherSchedule]), which sends each
block straight to its reader and each gradient straight back. Every rank derives every other
rank's needs from the layout, so no metadata travels. The received rows fill a buffer of one
segment (``min(w, seq)`` rows, as LongNet's all-gather holds them; only the needed rows are
filled) and the rank's rows run against it on the call's path
([`dilated.sparse.paths`][dilated.sparse.paths]):

- ``"tiles"`` ([`BlockSparseBody`][dilated.sparse.block_body.BlockSparseBody]): the engine's
  tiles ([`forward_into`][dilated.sparse.engine.forward_into], the queries shifted to the
  shard), merged into the rank's float32 accumulators call by call;
- ``"flash4"`` ([`Flash4SparseBody`][dilated.sparse.block_body.Flash4SparseBody]): the
  single-process flash4 path ([`dilated.sparse.flash4_path`][dilated.sparse.flash4_path]) on the
  segment buffer, its queries (and in the backward pass the output, its gradient and the LSE)
  placed at the rank's rows of a buffer of the same length, the layout's table cut to the
  rank's query blocks: one flash-attn-4 call per run walks only those blocks, the other rows'
  blocks are empty. The rank's rows of the result merge into the accumulators once per branch.
  The price is memory: per spanning branch, buffers of one segment for the queries and the
  output (in the backward pass also their gradients), beside the key/value buffers both
  bodies hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.core.caching import PlanCache
from dilated.core.sparsity import BranchLayout
from dilated.kernels.merge import merge_into
from dilated.ring.schedule import Held
from dilated.sparse import flash4_path
from dilated.sparse.engine import RunTable, backward_into, branch_runs, forward_into

__all__ = [
    "BlockSparseBody",
    "Flash4SparseBody",
    "Shards",
    "SparseBackwardRows",
    "SparseForwardRows",
    "Transfer",
    "needed_rows",
    "transfer_elements",
]


@dataclass(frozen=True)
class Shards:
    """The sharding of one call: ``world`` contiguous shards of ``shard`` positions each, the
    heads, the layout's block size and the causal flag."""

    seq: int
    shard: int
    world: int
    heads: int
    kv_heads: int
    block: int
    causal: bool


def _segment(sh: Shards, w: int, rank: int) -> tuple[int, int]:
    """``(first position, length)`` of the segment of branch ``w`` holding ``rank``'s shard."""
    length = min(w, sh.seq)
    return (rank * sh.shard) // length * length, length


def _query_table(sh: Shards, lay: BranchLayout, rank: int) -> tuple[torch.Tensor, int]:
    """The branch's table with only ``rank``'s query blocks kept, and its first block."""
    start, _ = _segment(sh, lay.segment_length, rank)
    r = lay.dilation_rate
    a0 = (rank * sh.shard - start) // r // sh.block
    count = sh.shard // r // sh.block
    table = torch.zeros_like(lay.blocks)
    table[a0 : a0 + count] = lay.blocks[a0 : a0 + count]
    if sh.causal:
        table &= torch.ones_like(table).tril()
    return table, a0


def _phase_kv_heads(sh: Shards, r: int, p: int) -> tuple[int, ...]:
    group = sh.heads // sh.kv_heads
    return tuple(sorted({j // group for j in range(p, sh.heads, r)}))


#: Rows one rank sends another for one branch: per phase, global positions and key/value heads.
Transfer = tuple[tuple[torch.Tensor, tuple[int, ...]], ...]


def needed_rows(sh: Shards, lay: BranchLayout, dst: int, src: int) -> Transfer:
    """The rows of ``src``'s shard that ``dst``'s queries need in a spanning branch."""
    start, length = _segment(sh, lay.segment_length, dst)
    r, b = lay.dilation_rate, sh.block
    table, _ = _query_table(sh, lay, dst)
    rows_of_segment = length // r
    needed = [
        blk for blk in torch.nonzero(table.any(0)).flatten().tolist() if blk * b < rows_of_segment
    ]
    parts = []
    for p in range(min(r, sh.heads)):
        mine = [blk for blk in needed if (start + blk * b * r) // sh.shard == src]
        if not mine:
            continue
        rows = torch.cat(
            [torch.arange(blk * b, min((blk + 1) * b, rows_of_segment)) for blk in mine]
        )
        parts.append((start + p + rows * r, _phase_kv_heads(sh, r, p)))
    return tuple(parts)


def transfer_elements(transfer: Transfer) -> int:
    """Key/value rows times heads of a transfer (multiply by batch, head_dim, 2 for k and v)."""
    return sum(len(pos) * len(heads) for pos, heads in transfer)


def _pack(x: torch.Tensor, y: torch.Tensor, transfer: Transfer, offset: int) -> torch.Tensor:
    """Flat: the transfer's rows of ``x`` then of ``y`` (positions minus ``offset``)."""
    parts = []
    for t in (x, y):
        for pos, heads in transfer:
            rows = t.index_select(1, (pos - offset).to(t.device))
            parts.append(rows.index_select(2, torch.tensor(heads, device=t.device)).flatten(1))
    return torch.cat(parts, dim=1).reshape(-1)


def _unpack(
    flat: torch.Tensor,
    transfer: Transfer,
    targets: tuple[torch.Tensor, torch.Tensor],
    offset: int,
    add: bool,
) -> None:
    """Write (or add) a packed block into the rows ``pos - offset`` of the two targets."""
    b, d = targets[0].shape[0], targets[0].shape[-1]
    flat = flat.view(b, -1)
    at = 0
    for t in targets:
        for pos, heads in transfer:
            n = len(pos) * len(heads) * d
            part = flat[:, at : at + n].reshape(b, len(pos), len(heads), d).to(t.dtype)
            at += n
            rows = (pos - offset).to(t.device)[:, None]
            cols = torch.tensor(heads, device=t.device)[None, :]
            if add:
                t[:, rows, cols] += part
            else:
                t[:, rows, cols] = part


def spanning_runs(sh: Shards, i: int, lay: BranchLayout, rank: int) -> list[RunTable]:
    """The engine's runs of branch ``i`` for ``rank``'s query blocks against a segment buffer."""
    _, length = _segment(sh, lay.segment_length, rank)
    table, a0 = _query_table(sh, lay, rank)
    runs = branch_runs(length, sh.heads, sh.kv_heads, i, length, lay.dilation_rate)
    return [(dataclasses.replace(run, q_shift=a0 * sh.block), table) for run in runs]


@dataclass(frozen=True)
class SparseForwardRows:
    """This rank's queries ``(batch, seq / P, heads, head_dim)`` and the engine's float32
    accumulators ``acc`` (shaped like them) and ``acc_lse`` ``(batch, seq / P, heads, 1)``."""

    q: torch.Tensor
    acc: torch.Tensor
    acc_lse: torch.Tensor


@dataclass(frozen=True)
class SparseBackwardRows:
    """This rank's rows in the backward pass: ``q``, the output gradient, the FINAL output and
    ``lse4`` ``(batch, seq / P, heads, 1)``, and the float32 gradients the tiles add into."""

    q: torch.Tensor
    grad_out: torch.Tensor
    out: torch.Tensor
    lse4: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


class BlockSparseBody:
    """The tiles of one spanning branch on one rank (a
    [`BlockBody`][dilated.ring.schedule.BlockBody] for the all-gather schedule).

    Args:
        sh: the sharding.
        index: the branch's position in the call's branch list.
        lay: its layout.
        rank: this rank.
        k, v: this rank's key/value shards ``(batch, seq / P, kv_heads, head_dim)``.
        rows: [`SparseForwardRows`][dilated.sparse.block_body.SparseForwardRows] or
            [`SparseBackwardRows`][dilated.sparse.block_body.SparseBackwardRows]: the pass.
        options: the keywords of [`forward_into`][dilated.sparse.engine.forward_into] (scale,
            causal flag, the segment's key padding mask, dropout).
        layout_key: the call's [`layout_key`][dilated.sparse.layouts.layout_key] (the flash4
            body's cache key of the rank's tables, with the branch and the sharding: required,
            since a key shared by two layouts would hand one the other's tables).
    """

    same_block_for_every_peer = False

    def __init__(
        self,
        sh: Shards,
        index: int,
        lay: BranchLayout,
        rank: int,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: SparseForwardRows | SparseBackwardRows,
        options: dict[str, Any],
        layout_key: str,
    ) -> None:
        self.sh, self.index, self.lay, self.rank = sh, index, lay, rank
        self.layout_key = layout_key
        self.k, self.v, self.rows, self.options = k, v, rows, options
        self.members = tuple(range(sh.world))
        self.block_dtype = k.dtype
        self.grad_dtype = compute_dtype(rows.q.dtype)
        self._transfers: dict[tuple[int, int], Transfer] = {}

    def transfer(self, dst: int, src: int) -> Transfer:
        """The rows ``src`` sends ``dst`` (worked out once per pass)."""
        key = (dst, src)
        if key not in self._transfers:
            self._transfers[key] = needed_rows(self.sh, self.lay, dst, src)
        return self._transfers[key]

    def block_numel(self, src: int, dst: int) -> int:
        b, d = self.k.shape[0], self.k.shape[-1]
        return 2 * b * d * transfer_elements(self.transfer(dst, src))

    def block_for(self, dst: int) -> torch.Tensor:
        return _pack(self.k, self.v, self.transfer(dst, self.rank), self.rank * self.sh.shard)

    def _buffers(self, held: Sequence[Held]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One segment's key/value buffers with the held rows filled in, and its start."""
        start, length = _segment(self.sh, self.lay.segment_length, self.rank)
        b, _, hkv, d = self.k.shape
        kbuf = self.k.new_zeros(b, length, hkv, d)
        vbuf = self.v.new_zeros(b, length, hkv, d)
        for h in held:
            _unpack(h.block, self.transfer(self.rank, h.src), (kbuf, vbuf), start, add=False)
        return kbuf, vbuf, start

    def forward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, SparseForwardRows)
        kbuf, vbuf, _ = self._buffers(held)
        runs = spanning_runs(self.sh, self.index, self.lay, self.rank)
        forward_into(
            runs, self.sh.block, rows.q, kbuf, vbuf, rows.acc, rows.acc_lse, **self.options
        )

    def backward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, SparseBackwardRows)
        kbuf, vbuf, start = self._buffers(held)
        dkbuf = torch.zeros(kbuf.shape, dtype=self.grad_dtype, device=kbuf.device)
        dvbuf = torch.zeros(vbuf.shape, dtype=self.grad_dtype, device=vbuf.device)
        runs = spanning_runs(self.sh, self.index, self.lay, self.rank)
        backward_into(
            runs, self.sh.block, rows.grad_out, rows.q, kbuf, vbuf, rows.out, rows.lse4,
            rows.dq, dkbuf, dvbuf, **self.options,
        )  # fmt: skip
        for h in held:
            h.grad = _pack(dkbuf, dvbuf, self.transfer(self.rank, h.src), start)

    def add_home(self, grads: Sequence[tuple[int, torch.Tensor]]) -> None:
        rows = self.rows
        assert isinstance(rows, SparseBackwardRows)
        here = self.rank * self.sh.shard
        for reader, grad in grads:
            _unpack(grad, self.transfer(reader, self.rank), (rows.dk, rows.dv), here, add=True)


_RANK_LAYOUTS: PlanCache[tuple[object, ...], BranchLayout] = PlanCache(
    "dilated.sparse.block_body.rank_layouts",
    maxsize=64,
    key="the layout key, the branch, the sharding and the rank",
)


class Flash4SparseBody(BlockSparseBody):
    """[`BlockSparseBody`][dilated.sparse.block_body.BlockSparseBody] on the flash4 path: the
    rank's rows of one spanning branch as the single-process flash4 path on the segment buffer.

    It takes the arguments of [`BlockSparseBody`][dilated.sparse.block_body.BlockSparseBody],
    ``options`` without dropout.
    """

    @property
    def first(self) -> int:
        """The rank's first row in the segment."""
        start, _ = _segment(self.sh, self.lay.segment_length, self.rank)
        return self.rank * self.sh.shard - start

    @property
    def layout(self) -> BranchLayout:
        """The branch's layout with only the rank's query blocks (cached)."""
        sh, lay, rank = self.sh, self.lay, self.rank
        key = (self.layout_key, self.index, sh.seq, sh.shard, sh.world, rank, sh.block, sh.causal)
        return _RANK_LAYOUTS.get_or_build(
            key, lambda: dataclasses.replace(lay, blocks=_query_table(sh, lay, rank)[0])
        )

    def _placed(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """``x`` ``(batch, seq / P, ...)`` at the rank's rows of a zero buffer of ``length``."""
        buf = x.new_zeros((x.shape[0], length, *x.shape[2:]))
        buf[:, self.first : self.first + self.sh.shard] = x
        return buf

    def _call(self) -> dict[str, Any]:
        return {
            "scale": self.options["scale"],
            "is_causal": self.sh.causal,
            "key_padding_mask": self.options["key_padding_mask"],
            "layout_key": f"{self.layout_key}|rows of branch {self.index}, rank {self.rank} "
            f"of {self.sh.world}",
        }

    def forward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, SparseForwardRows)
        kbuf, vbuf, _ = self._buffers(held)
        mine = slice(self.first, self.first + self.sh.shard)
        out, lse = flash4_path.forward(
            self._placed(rows.q, kbuf.shape[1]), kbuf, vbuf, [self.layout], self.sh.block,
            **self._call(),
        )  # fmt: skip
        acc_lse = rows.acc_lse[..., 0].transpose(1, 2)
        merge_into(rows.acc, acc_lse, out[:, mine], lse[:, :, mine])

    def backward(self, held: Sequence[Held]) -> None:
        rows = self.rows
        assert isinstance(rows, SparseBackwardRows)
        kbuf, vbuf, start = self._buffers(held)
        length = kbuf.shape[1]
        mine = slice(self.first, self.first + self.sh.shard)
        lse = self._placed(rows.lse4[..., 0], length).transpose(1, 2)
        dq, dk, dv = flash4_path.backward(
            self._placed(rows.grad_out, length), self._placed(rows.q, length), kbuf, vbuf,
            self._placed(rows.out, length), lse, [self.layout], self.sh.block, **self._call(),
        )  # fmt: skip
        rows.dq.add_(dq[:, mine])
        for h in held:
            h.grad = _pack(dk, dv, self.transfer(self.rank, h.src), start).to(self.grad_dtype)
