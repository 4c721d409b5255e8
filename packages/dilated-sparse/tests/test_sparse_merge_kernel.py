"""The engine with its Triton kernels (merge and gradient adds) under the interpreter on CPU."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("pattern", "is_causal"),
    # A band's interior is a stack with overlapping key windows (add_windows); global rows and
    # columns with causality give tall tiles and causal squares.
    [("local_window", False), ("global_local", True)],
)
def test_engine_with_the_fused_kernels(pattern: str, is_causal: bool) -> None:
    import functools

    from dilated.core import SparsePatternConfig
    from dilated.core.settings import use_settings
    from dilated.core.testing import check_on_random_inputs, dense_block_sparse_attention
    from dilated.sparse import block_sparse_dilated_attention

    extra = {"global_tokens": 2} if pattern == "global_local" else {}
    cfg = SparsePatternConfig(pattern, local_window_size=2, block_size=2, **extra)
    with use_settings(fused_merge=True, fused_accumulate=True):
        check_on_random_inputs(
            functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
            2, 37, 4, 8, [8, 16], [1, 2], kv_heads=2, is_causal=is_causal,
            reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
        )  # fmt: skip
