"""Hostile inputs to dilated-kernels: each is refused with an error naming the argument, or
computed exactly (judged by the dense float64 reference of ``dilated.core.testing``)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.testing import check_on_random_inputs, make_inputs
from dilated.core.testing.invalid import (
    NOT_BRANCH_LISTS,
    InvalidCall,
    assert_refuses,
    invalid_calls,
)
from dilated.kernels import (
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    dilated_attention,
)
from dilated.kernels.backends import triton as triton_backend

BACKENDS = ["auto", "reference", "sdpa"]
no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA present: the interpreter is not used"
)


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inp = make_inputs(1, 8, 2, 16, seed=0)
    return inp.q, inp.k, inp.v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [None, 3.0, "q", [[1.0]]])
def test_non_tensor_inputs_are_named(backend: str, which: int, bad: object) -> None:
    args: list[object] = list(_qkv())
    args[which] = bad
    with pytest.raises(TypeError, match=f"{'qkv'[which]} must be a torch.Tensor"):
        dilated_attention(*args, [4], [1], backend=backend)  # type: ignore[arg-type]


_INPUTS = make_inputs(1, 8, 4, 16, kv_heads=2, seed=0)
CALLS = invalid_calls(_INPUTS.q, _INPUTS.k, _INPUTS.v, [4, 8], [1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS, ids=repr)
def test_every_backend_refuses_every_invalid_call(backend: str, call: InvalidCall) -> None:
    assert_refuses(functools.partial(dilated_attention, backend=backend), call)


@pytest.mark.parametrize("backend", [["sdpa"], "bogus", None])
def test_bad_backend_is_named(backend: object) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        dilated_attention(*_qkv(), [4], [1], backend=backend)  # type: ignore[call-overload]


@pytest.mark.parametrize("bad", [*NOT_BRANCH_LISTS, (w for w in (4,))])
def test_modules_refuse_non_sequence_branches(bad: object) -> None:
    for name, args in (("segment_lengths", (bad, [1])), ("dilation_rates", ([4], bad))):
        with pytest.raises((TypeError, ValueError), match=name):
            ImprovedDilatedAttention(*args)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match=name):
            ImprovedMultiheadDilatedAttention(32, 2, *reversed(args))  # type: ignore[arg-type]


def test_mask_in_the_is_causal_slot_is_named() -> None:
    q, k, v = _qkv()
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"is_causal must be a bool.*key_padding_mask="):
        ImprovedDilatedAttention([4], [1])(q, k, v, mask)  # type: ignore[arg-type]
    mha = ImprovedMultiheadDilatedAttention(32, 2, [1], [4])
    x = torch.randn(1, 8, 32)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        mha(x, x, x, mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        ImprovedDilatedAttention([4], [1], check_finite="yes")  # type: ignore[arg-type]


def test_check_finite_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv()
    q[0, 1, 0, 0] = float("nan")
    monkeypatch.delenv("DILATED_CHECK_FINITE", raising=False)
    assert torch.isnan(dilated_attention(q, k, v, [4], [1])).any()
    for flag in ("1", "true", "ON"):
        monkeypatch.setenv("DILATED_CHECK_FINITE", flag)
        with pytest.raises(ValueError, match="q holds NaN or Inf"):
            dilated_attention(q, k, v, [4], [1])
        with pytest.raises(ValueError, match="q holds NaN or Inf"):
            ImprovedDilatedAttention([4], [1])(q, k, v)
    dilated_attention(q, k, v, [4], [1], check_finite=False)  # the argument wins
    monkeypatch.setenv("DILATED_CHECK_FINITE", "maybe")
    with pytest.raises(ValueError, match="DILATED_CHECK_FINITE"):
        dilated_attention(q, k, v, [4], [1])
    monkeypatch.delenv("DILATED_CHECK_FINITE")
    with pytest.raises(ValueError, match="q holds NaN or Inf"):
        ImprovedDilatedAttention([4], [1], check_finite=True)(q, k, v)
    mha = ImprovedMultiheadDilatedAttention(32, 2, [1], [4], check_finite=True)
    with pytest.raises(ValueError, match="q holds NaN or Inf"):
        mha(torch.full((1, 8, 32), float("nan")), *[torch.randn(1, 8, 32)] * 2)


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
def test_meta_device_gives_shape_and_dtype(backend: str) -> None:
    q = torch.empty(2, 24, 4, 16, device="meta", dtype=torch.float16)
    k = torch.empty(2, 24, 2, 16, device="meta", dtype=torch.float16)
    out, lse = dilated_attention(
        q, k, k, [8, 16], [1, 2], is_causal=True, return_lse=True, backend=backend
    )
    assert out.shape == q.shape and out.dtype == torch.float16 and out.device.type == "meta"
    assert lse.shape == (2, 4, 24) and lse.dtype == torch.float32
    mod = ImprovedDilatedAttention([8, 16], [1, 2], backend=backend)
    assert mod(q, k, k).shape == q.shape


@settings(max_examples=30)
@given(
    blocks=st.integers(1, 4),
    segments=st.integers(1, 12),
    batch_heads=st.integers(1, 12),
    limit=st.integers(1, 5),
)
def test_launch_grids_cover_every_program_once(
    blocks: int, segments: int, batch_heads: int, limit: int
) -> None:
    old = triton_backend.GRID_YZ_LIMIT
    triton_backend.GRID_YZ_LIMIT = limit
    try:
        launches = triton_backend.launch_grids(blocks, segments, batch_heads)
    finally:
        triton_backend.GRID_YZ_LIMIT = old
    covered = []
    for (gx, gy, gz), seg0, bh0 in launches:
        assert gx == blocks and 1 <= gy <= limit and 1 <= gz <= limit
        covered += [(seg0 + y, bh0 + z) for y in range(gy) for z in range(gz)]
    assert sorted(covered) == list(itertools.product(range(segments), range(batch_heads)))


def test_real_limit_gives_one_launch_for_ordinary_calls() -> None:
    assert triton_backend.launch_grids(8, 65535, 65535) == [((8, 65535, 65535), 0, 0)]
    assert len(triton_backend.launch_grids(8, 65536, 65536)) == 4


@pytest.mark.parametrize(("n", "w", "r"), [(19, 2**40, 4), (19, 20, 4), (19, 8, 4), (16, 16, 2)])
def test_effective_segment_covers_the_same_rows(n: int, w: int, r: int) -> None:
    w_eff = triton_backend.effective_segment(n, w, r)
    assert w_eff % r == 0 and w_eff <= w
    for p in range(r):  # the (segment, row) of every position of phase p is unchanged
        for t in range(p, n, r):
            assert (t // w, (t % w) // r) == (t // w_eff, (t % w_eff) // r)


@no_cuda
@pytest.mark.usefixtures("interpret")
def test_interpreter_refuses_bfloat16() -> None:
    inp = make_inputs(1, 8, 2, 16, dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match=r"interpreter.*bfloat16"):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], backend="triton")
    assert triton_backend.unsupported_reason(inp.q, 0.0) is not None
    # "auto" never routes there: on CPU it takes the reference, which is exact in bfloat16.
    out = dilated_attention(inp.q, inp.k, inp.v, [4], [1])
    assert out.dtype == torch.bfloat16 and out.abs().max() < 10


@no_cuda
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("causal", [False, True])
def test_interpreter_chunked_grid_matches_dense(
    causal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limit of 2 splits every branch here over segments (19 / 4 -> 5) and batch * heads (8).
    monkeypatch.setattr(triton_backend, "GRID_YZ_LIMIT", 2)
    attention = functools.partial(dilated_attention, return_lse=True, backend="triton")
    check_on_random_inputs(
        attention, 2, 19, 4, 16, (4, 8), (1, 2), kv_heads=2, is_causal=causal, padding=True,
        seed=3,
    )  # fmt: skip


@no_cuda
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_huge_segment_matches_dense(backend: str) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend=backend)
    check_on_random_inputs(
        attention, 1, 19, 4, 16, (8, 2**40), (1, 4), is_causal=True, padding=True, seed=4
    )
