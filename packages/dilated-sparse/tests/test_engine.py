"""Engine decisions that the judge alone would not show: which calls leave the accumulators
unfilled (the conftest fills such memory with NaN for every test)."""

from __future__ import annotations

import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import resolve_layouts
from dilated.sparse import engine


@pytest.mark.parametrize(
    ("cfg", "rates", "is_causal", "expected"),
    [
        # A band writes every block once, interior stack then edges: no fill.
        (
            SparsePatternConfig("local_window", local_window_size=2, block_size=2),
            [1, 2],
            False,
            True,
        ),
        (
            SparsePatternConfig("local_window", local_window_size=2, block_size=2),
            [1, 2],
            True,
            True,
        ),
        (SparsePatternConfig("dense", block_size=2), [1, 2], False, True),
        # A first branch with rate 2 leaves every head's other-phase rows to later branches.
        (
            SparsePatternConfig("local_window", local_window_size=2, block_size=2),
            [2, 2],
            False,
            False,
        ),
        # A layout row with no block leaves rows uncovered.
        (
            SparsePatternConfig(
                "custom", block_size=2, layout=torch.eye(12, dtype=torch.bool).roll(1, 0).triu()
            ),
            [1, 2],
            False,
            False,
        ),
    ],
)
def test_which_calls_skip_the_fill(
    cfg: SparsePatternConfig, rates: list[int], is_causal: bool, expected: bool
) -> None:
    layouts = resolve_layouts(cfg, [8, 16], rates)
    runs = engine.run_tables(layouts, 37, 4, 4)
    q = torch.empty(1, 37, 4, 8, device="meta")
    lse = torch.empty(1, 37, 4, 1, device="meta")
    plan = engine._steps(runs, cfg.block_size, is_causal, [q, q, q, q, lse], None)
    assert plan.writes_every_row is expected
