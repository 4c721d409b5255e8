"""The distributed block-sparse module over real gloo process groups (spawned ranks)."""

from __future__ import annotations

import pytest
from sparse_gloo_workers import disagreements, run_gloo

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    ("pattern", "is_causal"), [("local_window", True), ("dilated_sparse", False)]
)
def test_gloo_ranks_equal_the_single_process_op(world: int, pattern: str, is_causal: bool) -> None:
    run_gloo(world, pattern, is_causal)


def test_gloo_ranks_raise_at_once_on_a_bad_or_disagreeing_rank() -> None:
    """Different custom layouts, an int segment_lengths or a bad timeout_s on one rank, a NaN
    under DILATED_CHECK_FINITE=1, non-bool flags: every rank raises within seconds, naming the
    argument or option (the ring's guarantees, through its agreement code)."""
    run_gloo(2, body=disagreements, timeout=120.0)
