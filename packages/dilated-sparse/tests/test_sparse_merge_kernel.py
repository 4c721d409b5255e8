"""The engine with the one-launch Triton merge (under the interpreter on CPU)."""

from __future__ import annotations

import pytest


def test_engine_with_the_fused_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from dilated.core import SparsePatternConfig
    from dilated.core.testing import check_on_random_inputs, dense_block_sparse_attention
    from dilated.kernels import merge
    from dilated.sparse import block_sparse_dilated_attention

    monkeypatch.setattr(merge, "FUSED", True)
    cfg = SparsePatternConfig("global_local", local_window_size=2, global_tokens=2, block_size=2)
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        2, 37, 4, 8, [8, 16], [1, 2], kv_heads=2, is_causal=True,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip
