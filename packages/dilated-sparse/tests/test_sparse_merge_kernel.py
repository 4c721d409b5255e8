"""The fused Triton merge equals dilated.core.merge.merge_into (under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from dilated.core.merge import merge_into


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "n", "h", "d"), [(2, 7, 3, 8), (1, 33, 1, 20), (3, 5, 4, 64)])
def test_fused_merge_is_merge_into(dtype: torch.dtype, b: int, n: int, h: int, d: int) -> None:
    from dilated.sparse._merge_kernel import fused_merge_into

    gen = torch.Generator().manual_seed(n)
    # Strided accumulators (every other row of a larger buffer), as the engine's views are.
    acc = torch.randn(b, 2 * n, h, d, generator=gen)[:, ::2]
    acc_lse = torch.randn(b, h, 2 * n, generator=gen)[:, :, ::2]
    out = torch.randn(b, n, h, d, generator=gen).to(dtype)
    lse = torch.randn(b, h, n, generator=gen)
    acc_lse[:, :, 0] = float("-inf")  # nothing merged yet
    lse[:, :, 1] = float("-inf")  # the part covers nothing
    acc_lse[:, :, 2] = lse[:, :, 2] = float("-inf")  # empty on both sides
    acc[:, 2] = 0.0
    want_acc, want_lse = acc.clone(), acc_lse.clone()
    merge_into(want_acc, want_lse, out, lse)
    fused_merge_into(acc, acc_lse, out, lse)
    assert torch.allclose(acc, want_acc, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(acc_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(acc_lse[finite], want_lse[finite], atol=1e-5)
    assert torch.equal(acc[:, 2], torch.zeros_like(acc[:, 2]))


def test_engine_with_the_fused_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from dilated.core import SparsePatternConfig
    from dilated.core.testing import check_on_random_inputs, dense_block_sparse_attention
    from dilated.sparse import block_sparse_dilated_attention, engine

    monkeypatch.setattr(engine, "FUSED_MERGE", True)
    cfg = SparsePatternConfig("global_local", local_window_size=2, global_tokens=2, block_size=2)
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        2, 37, 4, 8, [8, 16], [1, 2], kv_heads=2, is_causal=True,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip
