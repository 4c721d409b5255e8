"""The distributed block-sparse module over real gloo process groups (spawned ranks)."""

from __future__ import annotations

import pytest
from sparse_gloo_workers import run_gloo

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    ("pattern", "is_causal"), [("local_window", True), ("dilated_sparse", False)]
)
def test_gloo_ranks_equal_the_single_process_op(world: int, pattern: str, is_causal: bool) -> None:
    run_gloo(world, pattern, is_causal)
