"""The tiling of a block layout into dense calls, and how the calls are batched."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import layout_blocks, resolve_layouts
from dilated.sparse.engine import count_calls
from dilated.sparse.tiles import Tile, plan_tiles, tile_mask


def _allowed(table: torch.Tensor, length: int, block: int, causal: bool) -> torch.Tensor:
    blk = torch.arange(length) // block
    want = table[blk[:, None], blk[None, :]]
    if causal:
        want &= torch.ones(length, length, dtype=torch.bool).tril()
    return want


@given(
    nb=st.integers(1, 9),
    block=st.integers(1, 4),
    cut=st.integers(0, 3),
    causal=st.booleans(),
    data=st.data(),
)
def test_tiles_cover_each_allowed_pair_once(
    nb: int, block: int, cut: int, causal: bool, data: st.DataObject
) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=nb * nb, max_size=nb * nb))
    table = torch.tensor(bits, dtype=torch.bool).reshape(nb, nb)
    length = max(1, nb * block - min(cut, block - 1))
    tiles = plan_tiles(table, length, block, causal)
    assert torch.equal(
        tile_mask(tiles, length, block), _allowed(table, length, block, causal).int()
    )
    for t in tiles:
        assert (t.stack == 1 or t.step >= t.qn) and (
            not t.causal or (t.q0 == t.k0 and t.qn == t.kn)
        )


def test_dense_is_one_call_and_a_band_is_a_stack_plus_edges() -> None:
    dense = torch.ones(8, 8, dtype=torch.bool)
    assert plan_tiles(dense, 32, 4, False) == (Tile(0, 8, 0, 8),)
    assert plan_tiles(dense, 30, 4, True) == (Tile(0, 8, 0, 8, causal=True),)
    band = plan_tiles(layout_blocks("local_window", 8, window=2), 32, 4, False)
    assert Tile(2, 1, 0, 5, stack=4, step=1) in band and len(band) == 5  # 4 edge rows
    causal_band = plan_tiles(layout_blocks("local_window", 9, window=2), 36, 4, True)
    assert Tile(0, 3, 0, 3, stack=3, step=3, causal=True) in causal_band


def test_calls_fold_phases_segments_and_batch() -> None:
    # Dense layout, seq a multiple of every segment: one call per branch (phases folded and
    # segments merged with the batch), as many as the plain dilated op makes per branch.
    dense = resolve_layouts(SparsePatternConfig("dense", block_size=4), [16, 32], [1, 4])
    assert count_calls(dense, 4, (2, 64, 4, 8), 4, False) == 2
    # Grouped-query attention keeps one run per phase.
    assert count_calls(dense, 4, (2, 64, 4, 8), 2, False) == 1 + 4
    # A band: the interior rows of all phases (one head each) take the head slot of one call.
    band = resolve_layouts(
        SparsePatternConfig("local_window", local_window_size=4, block_size=4), [64], [4]
    )
    assert count_calls(band, 4, (1, 64, 4, 8), 4, False) == 1 + 2
    # Two segments: one index dim too many for batch and head slot, so the stack loops twice.
    assert count_calls(band, 4, (1, 128, 4, 8), 4, False) == 2 + 2
