"""The cudnn, triton and sdpa backends on CUDA at real sizes (skipped without a GPU)."""

from __future__ import annotations

import functools

import pytest
import torch

from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_dilated_attention,
    make_inputs,
)
from dilated.kernels import dilated_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_dense_on_gpu(
    backend: str, dtype: torch.dtype, head_dim: int, causal: bool, gqa: bool
) -> None:
    seq, heads = 1000, 4  # not a multiple of any segment
    ws, rs = (128, 256, 512), (1, 2, 4)
    attention = functools.partial(dilated_attention, return_lse=True, backend=backend)
    check_on_random_inputs(
        attention, 1, seq, heads, head_dim, ws, rs, kv_heads=2 if gqa else heads,
        is_causal=causal, padding=True, dtype=dtype, device="cuda", seed=head_dim,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("batch", "seq"), [(2, 1000), (2, 1024), (1, 1536)])
def test_cudnn_matches_dense_on_gpu(
    dtype: torch.dtype, head_dim: int, causal: bool, batch: int, seq: int
) -> None:
    # 1000: partial last segments (one call per batch); 1024: batches merged into one call.
    ws, rs = (128, 256, 512), (1, 2, 4)
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, batch, seq, 4, head_dim, ws, rs, is_causal=causal, dtype=dtype,
        device="cuda", seed=head_dim,
    )  # fmt: skip


def test_cudnn_chunks_match_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from dilated.kernels.backends import cudnn

    inp = make_inputs(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    ws, rs = (512, 1024), (1, 2)
    whole = dilated_attention(inp.q, inp.k, inp.v, ws, rs, is_causal=True, backend="cudnn")
    grads = torch.autograd.grad(whole.float().square().sum(), (inp.q, inp.k, inp.v))
    monkeypatch.setattr(cudnn, "CHUNK_ELEMENTS", 1024 * 8 * 128)
    assert len(cudnn._chunks(2, 4096, 8, 128, ws)) == 4
    parts = dilated_attention(inp.q, inp.k, inp.v, ws, rs, is_causal=True, backend="cudnn")
    chunked = torch.autograd.grad(parts.float().square().sum(), (inp.q, inp.k, inp.v))
    # Same sub-problems in other batch groupings: equal up to cuDNN's choice of kernel.
    assert_close_to_reference(parts, whole.double(), torch.bfloat16)
    for name, got, want in zip(("dq", "dk", "dv"), chunked, grads):
        assert_close_to_reference(got, want.double(), torch.bfloat16, name)


def test_triton_float32_on_gpu() -> None:
    inp = make_inputs(2, 300, 4, 64, kv_heads=2, device="cuda", seed=0)
    out = dilated_attention(inp.q, inp.k, inp.v, (64, 128), (1, 2), backend="triton")
    ref, _ = dense_dilated_attention(
        inp.q.double(), inp.k.double(), inp.v.double(), (64, 128), (1, 2)
    )
    assert_close_to_reference(out, ref, torch.float32)


def test_every_output_element_written() -> None:
    # Poisoned inputs outside the attended rows must not leak, and every row must be finite.
    inp = make_inputs(1, 4096, 8, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, (512, 1024), (1, 2), return_lse=True, backend="triton"
    )
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert bool((out.abs().sum(-1) > 0).all())


def test_auto_picks_cudnn_then_triton_on_cuda() -> None:
    from dilated.kernels.backends import choose_backend

    q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 8, dtype=torch.bool, device="cuda")
    assert choose_backend(q, q, None, 0.0) == "cudnn"
    assert choose_backend(q, q[:, :, :1], None, 0.0) == "triton"  # GQA
    assert choose_backend(q, q, mask, 0.0) == "triton"
    assert choose_backend(q.float(), q.float(), None, 0.0) == "triton"
    assert choose_backend(q, q, None, 0.1) in ("flash", "sdpa")


def test_triton_more_segments_than_cuda_grid_axis() -> None:
    # 65536 * 2 + 6 positions with w = 2: 65540 segments, beyond grid axis y (65535).
    from dilated.core import dilated_attention as reference_attention
    from dilated.core.testing import assert_close_to_reference

    inp = make_inputs(1, 65536 * 2 + 6, 2, 16, dtype=torch.float16, device="cuda", seed=5)
    mask = torch.ones(1, inp.q.shape[1], dtype=torch.bool, device="cuda")
    mask[:, 7::11] = False  # "auto" takes triton with a key padding mask
    out = dilated_attention(inp.q, inp.k, inp.v, [2, 8], [1, 2], key_padding_mask=mask)
    want = reference_attention(
        inp.q.double(), inp.k.double(), inp.v.double(), [2, 8], [1, 2], key_padding_mask=mask
    )
    assert_close_to_reference(out, want, torch.float16)


def test_triton_more_batch_heads_than_cuda_grid_axis() -> None:
    # batch * heads = 2 * 32772 = 65544, beyond grid axis z (65535); checked with gradients.
    attention = functools.partial(dilated_attention, return_lse=True, backend="triton")
    check_on_random_inputs(
        attention, 2, 20, 32772, 16, (4, 8), (1, 2), kv_heads=4, is_causal=True, padding=True,
        dtype=torch.float16, device="cuda", seed=6,
    )  # fmt: skip


def test_triton_huge_segment_length() -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="triton")
    check_on_random_inputs(
        attention, 1, 1000, 4, 64, (128, 2**40), (1, 4), is_causal=True, padding=True,
        dtype=torch.bfloat16, device="cuda", seed=7,
    )  # fmt: skip
