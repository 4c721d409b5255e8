"""The FlexAttention comparison of ``benchmarks/sparse.py`` builds its block mask from the layout
tables, not by evaluating the mask on every token pair: its table must be exact (every allowed
pair in a kept block, no kept block without one), or the comparison would time another
pattern."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import resolve_layouts


@pytest.fixture(scope="module")
def bench(script: Callable[[str, str], ModuleType]) -> ModuleType:
    return script("benchmarks/sparse.py", "sparse_benchmark")


def test_tables_are_exact(bench: ModuleType) -> None:
    # Rates above the token block, more phases than heads, short last segments, every layout
    # kind, causal and not.
    bench.self_check_flex_table()


def test_the_check_catches_a_wrong_table(bench: ModuleType) -> None:
    ws, rs, seq, heads, block, token = [64, 128], [1, 4], 200, 2, 4, 8
    cfg = SparsePatternConfig("local_window", sparsity_ratio=0.3, block_size=block)
    layouts = resolve_layouts(cfg, ws, rs)
    flex = bench.FlexPattern(torch.zeros(1, seq, heads, 1), ws, rs, False, 32)
    flex.load(layouts, block)
    table = bench.flex_block_table(layouts, seq, heads, False, token, block=block)
    bench.check_flex_table(flex.mask_mod, table, seq, token, "right")
    for flip in (table.nonzero()[0], (~table).nonzero()[0]):
        wrong = table.clone()
        wrong[tuple(flip)] ^= True
        with pytest.raises(AssertionError, match="flex block table"):
            bench.check_flex_table(flex.mask_mod, wrong, seq, token, "wrong")
