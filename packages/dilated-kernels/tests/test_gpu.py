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
@pytest.mark.parametrize("head_dim", [32, 128])
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
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
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


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "ws", "rs"),
    [
        (1, 4096, 16, 16, (2048, 4096, 8192), (1, 2, 4)),  # phases on the batch axis
        (1, 3000, 16, 16, (2048, 4096, 8192), (1, 2, 4)),  # a tail: phases of two row counts
        (2, 3000, 8, 8, (512, 1024, 4096), (1, 8, 16)),  # r >= heads: phases on the head axis
        (1, 2048, 16, 4, (512, 1024), (2, 4)),  # group 4: every phase reads all kv heads
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_calls_holding_several_phases_on_gpu(
    backend: str,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
) -> None:
    # Views whose batch or head step is one row plus one head, read in place by each engine.
    from dilated.kernels.engines import flash4

    if backend == "flash" and not flash4.available(torch.device("cuda")):
        pytest.skip(flash4.INSTALL_HINT)
    attention = functools.partial(dilated_attention, return_lse=True, backend=backend)
    check_on_random_inputs(
        attention, batch, seq, heads, 64, ws, rs, kv_heads=kv_heads, is_causal=causal,
        dtype=torch.bfloat16, device="cuda", seed=seq,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("heads", "kv_heads", "rs"),
    [
        (8, 2, (1, 2, 4)),  # grouped: rates divide the group or the group divides them
        (8, 4, (1, 2, 4)),
        (8, 1, (1, 2, 8)),  # multi-query
        (6, 2, (1, 2, 3)),  # group 3 with rate 2: heads expanded once
    ],
)
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_cudnn_grouped_query_and_padding_on_gpu(
    heads: int, kv_heads: int, rs: tuple[int, ...], padding: bool, causal: bool, head_dim: int
) -> None:
    ws = (128, 256, 384)
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, 2, 1000, heads, head_dim, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=padding, dtype=torch.bfloat16, device="cuda", seed=heads * kv_heads + head_dim,
    )  # fmt: skip


def test_cudnn_fully_padded_rows_on_gpu() -> None:
    inp = make_inputs(2, 1024, 8, 128, kv_heads=2, dtype=torch.bfloat16, device="cuda",
                      requires_grad=True, seed=3)  # fmt: skip
    mask = torch.zeros(2, 1024, dtype=torch.bool, device="cuda")
    mask[0, :512] = True  # the first two segments of w=256 see no key
    mask[1] = True
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, (256,), (1,), key_padding_mask=mask, return_lse=True
    )
    assert bool((out[0, :512] == 0).all()) and bool((out[1] == 0).all())
    assert bool(torch.isinf(lse[0, :, :512]).all()) and bool(torch.isfinite(lse[0, :, 512:]).all())
    grads = torch.autograd.grad(out.float().square().sum(), (inp.q, inp.k, inp.v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cudnn_dropout_statistics_and_replay_on_gpu(kv_heads: int) -> None:
    """cuDNN's dropout: seeded, unbiased (the mean of many draws is the undropped output), and
    the backward replays the forward's masks (out is linear in v for a fixed draw)."""
    inp = make_inputs(1, 512, 8, 64, kv_heads=kv_heads, dtype=torch.bfloat16, device="cuda",
                      seed=2)  # fmt: skip
    ws, rs, p = (128, 256), (1, 2), 0.3

    def draw(v: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dilated_attention(inp.q, inp.k, v, ws, rs, dropout_p=p, is_causal=True)

    assert torch.equal(draw(inp.v, 1), draw(inp.v, 1))
    assert not torch.equal(draw(inp.v, 1), draw(inp.v, 2))
    clean, _ = dense_dilated_attention(
        inp.q.double(), inp.k.double(), inp.v.double(), ws, rs, is_causal=True
    )
    mean = torch.stack([draw(inp.v, s).double() for s in range(400)]).mean(0)
    # The mean of 400 draws is 20 times closer than one draw to the undropped output.
    one = (draw(inp.v, 1).double() - clean).abs().mean().item()
    assert (mean - clean).abs().mean().item() < one / 8
    v = inp.v.detach().requires_grad_()
    g = torch.randn_like(inp.q)
    out = draw(v, 7)
    (dv,) = torch.autograd.grad((out.float() * g.float()).sum(), (v,))
    u = torch.randn_like(v)
    change = ((draw(v.detach() + u, 7) - out.detach()).double() * g.double()).sum().item()
    predicted = (dv.double() * u.double()).sum().item()
    assert abs(change - predicted) <= 0.03 * abs(predicted), (change, predicted)


def test_cudnn_chunks_match_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from dilated.kernels import strided_plan

    inp = make_inputs(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    ws, rs = (512, 1024), (1, 2)
    whole = dilated_attention(inp.q, inp.k, inp.v, ws, rs, is_causal=True, backend="cudnn")
    grads = torch.autograd.grad(whole.float().square().sum(), (inp.q, inp.k, inp.v))
    monkeypatch.setattr(strided_plan, "CHUNK_ELEMENTS", 1024 * 8 * 128)
    assert len(strided_plan.chunks(2, 4096, 8, 128, ws)) == 4
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


def test_auto_picks_cudnn_for_every_16_bit_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from dilated.kernels import backends
    from dilated.kernels.backends import choose_backend

    monkeypatch.setattr(backends, "_warned", set())  # warnings are once per (dtype, head_dim)

    q = torch.zeros(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 8, dtype=torch.bool, device="cuda")
    assert choose_backend(q, q, None, 0.0) == "cudnn"
    assert choose_backend(q, q[:, :, :1], None, 0.0) == "cudnn"  # GQA
    assert choose_backend(q, q, mask, 0.0) == "cudnn"
    assert choose_backend(q, q, None, 0.1) == "cudnn"
    with pytest.warns(UserWarning, match="Triton kernel"):
        assert choose_backend(q.float(), q.float(), None, 0.0) == "triton"
    odd = torch.zeros(1, 8, 2, 36, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="got 36"):
        assert choose_backend(odd, odd, None, 0.0) == "triton"
    # A key mask on cuDNN only at the head sizes verified there (others crashed cuDNN).
    small = torch.zeros(1, 8, 2, 16, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(small, small, None, 0.0) == "cudnn"
    with pytest.warns(UserWarning, match="a key mask run on cuDNN only with head_dim"):
        assert choose_backend(small, small, mask, 0.0) == "triton"


def test_triton_more_segments_than_cuda_grid_axis() -> None:
    # 65536 * 2 + 6 positions with w = 2: 65540 segments, beyond grid axis y (65535).
    from dilated.core import dilated_attention as reference_attention
    from dilated.core.testing import assert_close_to_reference

    inp = make_inputs(1, 65536 * 2 + 6, 2, 16, dtype=torch.float16, device="cuda", seed=5)
    mask = torch.zeros(1, inp.q.shape[1], dtype=torch.bool, device="cuda")
    mask[:, 7::11] = True
    out = dilated_attention(
        inp.q, inp.k, inp.v, [2, 8], [1, 2], key_padding_mask=mask, backend="triton"
    )
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


def _qkv_and_mask(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = make_inputs(2, 2048, 8, 128, kv_heads=2, padding=True, dtype=torch.bfloat16,
                    device="cuda", requires_grad=True, seed=seed)  # fmt: skip
    assert x.key_padding_mask is not None
    return x.q, x.k, x.v, x.key_padding_mask


def test_auto_compiles_with_fullgraph_on_gpu() -> None:
    """``"auto"`` on CUDA (the cuDNN custom op) compiles without a graph break and equals eager."""
    q, k, v, mask = _qkv_and_mask(1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(q, k, v, (512, 1024), (1, 2), is_causal=True,
                                 key_padding_mask=mask)  # fmt: skip

    eager = attend(q, k, v)
    compiled = torch.compile(attend, fullgraph=True)(q, k, v)
    assert_close_to_reference(compiled, eager.double(), torch.bfloat16)
    g = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (q, k, v), g)
    got = torch.autograd.grad(compiled, (q, k, v), g)
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(a, e.double(), torch.bfloat16, name)


def test_training_step_captures_in_a_cuda_graph() -> None:
    """Forward and backward of the cuDNN path captured once, replayed on new inputs: the
    gradients equal an eager step on those inputs."""
    q, k, v, mask = _qkv_and_mask(2)
    leaves = (q, k, v)

    def step() -> None:
        out = dilated_attention(q, k, v, (512, 1024), (1, 2), is_causal=True,
                                key_padding_mask=mask)  # fmt: skip
        out.float().square().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up away from the capture stream, as capture requires
        for _ in range(2):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    fresh = make_inputs(2, 2048, 8, 128, kv_heads=2, dtype=torch.bfloat16, device="cuda", seed=9)
    with torch.no_grad():
        for t, new in zip(leaves, (fresh.q, fresh.k, fresh.v)):
            t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.grad.clone() for t in leaves if t.grad is not None]
    assert len(replayed) == 3
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = dilated_attention(*eager_leaves, (512, 1024), (1, 2), is_causal=True,
                            key_padding_mask=mask)  # fmt: skip
    want = torch.autograd.grad(out.float().square().sum(), eager_leaves)
    for name, a, e in zip(("dq", "dk", "dv"), replayed, want):
        assert_close_to_reference(a, e.double(), torch.bfloat16, name)


def test_reduce_overhead_compile_replays_the_training_step() -> None:
    """The docs' short-sequence recipe: ``torch.compile(mode="reduce-overhead")`` of the
    multi-head module (CUDA graphs managed by PyTorch) equals eager, forward and backward, at a
    short length where the phases share calls."""
    from dilated.kernels import ImprovedMultiheadDilatedAttention

    torch.manual_seed(0)
    mha = ImprovedMultiheadDilatedAttention(
        512, 8, [1, 2, 4], [512, 1024, 2048], is_causal=True, device="cuda", dtype=torch.bfloat16
    )
    step = torch.compile(mha, mode="reduce-overhead")
    for seed in range(4):  # recorded, then replayed on new inputs
        torch.manual_seed(seed)
        x = torch.randn(1, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        got, _ = step(x, x, x)
        (dx,) = torch.autograd.grad(got.float().square().sum(), x)
        want, _ = mha(x, x, x)
        (dx_want,) = torch.autograd.grad(want.float().square().sum(), x)
        assert_close_to_reference(got.clone(), want.double(), torch.bfloat16)
        assert_close_to_reference(dx, dx_want.double(), torch.bfloat16, "dx")


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize(("batch", "seq"), [(2, 2048), (1, 3000)])
def test_heads_first_layout_on_gpu(backend: str, batch: int, seq: int) -> None:
    """transformers' ``(batch, heads, seq, head_dim)`` tensors, transposed, read in place by
    each engine (no copy), forward and backward."""
    from dilated.kernels.engines import flash4

    if backend == "flash" and not flash4.available(torch.device("cuda")):
        pytest.skip(flash4.INSTALL_HINT)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = dilated_attention(
            heads_first(q), heads_first(k), heads_first(v), *args, return_lse=True,
            backend=backend, **kwargs,
        )  # fmt: skip
        return out, lse

    check_on_random_inputs(
        attention, batch, seq, 8, 128, (512, 1024, 2048), (1, 2, 4), kv_heads=4,
        is_causal=True, dtype=torch.bfloat16, device="cuda", seed=seq,
    )  # fmt: skip
