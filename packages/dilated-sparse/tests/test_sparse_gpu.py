"""block_sparse_dilated_attention on CUDA: the tiles run on cuDNN (skipped without a GPU).

Run by the lead on an H100/H200: ``uv run pytest -q packages/dilated-sparse/tests -m gpu``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_block_sparse_attention,
    make_inputs,
)
from dilated.kernels import dilated_attention
from dilated.kernels.subproblem import cudnn_supports
from dilated.sparse import block_sparse_dilated_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYOUTS = [
    SparsePatternConfig("local_window", local_window_size=128, block_size=64),
    SparsePatternConfig("global_local", sparsity_ratio=0.3, block_size=64, global_tokens=64),
    SparsePatternConfig("dilated_sparse", block_size=32),
    SparsePatternConfig("custom", block_size=64, layout=lambda a, b: (a + b) % 3 != 1),
]


@pytest.mark.parametrize("cfg", LAYOUTS, ids=lambda c: c.pattern_type)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("batch", "seq", "kv_heads"), [(2, 1024, 4), (1, 1000, 4), (2, 1000, 2)])
def test_matches_the_judge_on_gpu(
    cfg: SparsePatternConfig, dtype: torch.dtype, causal: bool, batch: int, seq: int, kv_heads: int
) -> None:
    # 1024: whole segments (batch and segments merged); 1000: short last segments; GQA.
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        batch, seq, 4, 64, [256, 512, 1024], [1, 2, 4], kv_heads=kv_heads, is_causal=causal,
        dtype=dtype, device="cuda", seed=seq,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_and_dropout_on_gpu(causal: bool) -> None:
    cfg = LAYOUTS[1]
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        2, 777, 4, 64, [256, 512], [1, 2], is_causal=causal, padding=True,
        dtype=torch.bfloat16, device="cuda",
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip
    x = make_inputs(1, 1024, 4, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = block_sparse_dilated_attention(
        x.q, x.k, x.v, [256, 512], [1, 2], sparse_config=cfg, dropout_p=0.1, is_causal=causal
    )
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x.q, x.k, x.v))


def test_dense_layout_equals_the_cudnn_op_at_size() -> None:
    x = make_inputs(1, 65536, 16, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    assert cudnn_supports(x.q, x.k)
    ws, rs = [4096, 16384, 65536], [1, 4, 16]
    sparse = block_sparse_dilated_attention(
        x.q, x.k, x.v, ws, rs, sparse_config=SparsePatternConfig("dense"), is_causal=True
    )
    dense = dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=True, backend="cudnn")
    assert_close_to_reference(sparse, dense, torch.bfloat16)
    grad = torch.randn_like(dense)
    got = torch.autograd.grad(sparse, (x.q, x.k, x.v), grad)
    want = torch.autograd.grad(dense, (x.q, x.k, x.v), grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, torch.bfloat16, name)


def test_fused_merge_on_gpu() -> None:
    from dilated.core.merge import merge_into
    from dilated.kernels.merge import merge_into as fused_merge_into  # Triton on CUDA float32

    acc = torch.randn(2, 4096, 16, 128, device="cuda")[:, ::2]
    acc_lse = torch.randn(2, 16, 4096, device="cuda")[:, :, ::2]
    out = torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(2, 16, 2048, device="cuda")
    lse[:, :, :7] = float("-inf")
    want_acc, want_lse = acc.clone(), acc_lse.clone()
    merge_into(want_acc, want_lse, out, lse)
    fused_merge_into(acc, acc_lse, out, lse)
    assert torch.allclose(acc, want_acc, atol=1e-5, rtol=1e-5)
    assert torch.allclose(acc_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_module_compiles_with_fullgraph_on_gpu() -> None:
    from dilated.sparse import BlockSparseRingDilatedAttention

    x = make_inputs(1, 2048, 8, 64, kv_heads=4, dtype=torch.bfloat16, device="cuda",
                    requires_grad=True, seed=11)  # fmt: skip
    attn = BlockSparseRingDilatedAttention([512, 1024], [1, 2], sparse_config=LAYOUTS[1],
                                           is_causal=True)  # fmt: skip
    eager = attn(x.q, x.k, x.v)
    compiled = torch.compile(attn, fullgraph=True)(x.q, x.k, x.v)
    assert_close_to_reference(compiled, eager.double(), torch.bfloat16)
    g = torch.randn_like(eager)
    for name, a, e in zip(
        ("dq", "dk", "dv"),
        torch.autograd.grad(compiled, (x.q, x.k, x.v), g),
        torch.autograd.grad(eager, (x.q, x.k, x.v), g),
    ):
        assert_close_to_reference(a, e.double(), torch.bfloat16, name)
