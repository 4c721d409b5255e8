"""The ``"cudnn"`` backend's planning and Triton gather kernels on CPU, against the dense judge.

Without CUDA the backend replaces each cuDNN call by the same dense math in PyTorch and runs its
Triton merge/sum kernels under ``TRITON_INTERPRET=1``; everything but the cuDNN calls themselves
(covered on the GPU by ``test_gpu.py``) is exercised here: chunking, partial last segments, batch
merging, phases, causal, the LSE merge and the gradient sums.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    make_inputs,
)
from dilated.kernels import dilated_attention
from dilated.kernels.backends import cudnn

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA present: the cuDNN path is tested in test_gpu.py"
    ),
    pytest.mark.usefixtures("interpret"),
]


def _check(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    *,
    causal: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, batch, seq, heads, head_dim, ws, rs, is_causal=causal, dtype=dtype, seed=seed
    )


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "head_dim", "ws", "rs"),
    [
        (2, 16, 2, 16, (4, 8), (1, 2)),  # whole segments: batch merged into one call
        (2, 19, 4, 16, (4, 8, 16), (1, 2, 4)),  # partial last segments: one call per batch
        (1, 40, 2, 32, (16, 32), (1, 2)),  # every w a multiple of 16: one table row per block
        (2, 70, 4, 16, (32, 64), (2, 4)),
        (2, 12, 2, 16, (32,), (8,)),  # more phases than heads: uncovered rows stay 0 / -inf
        (1, 5, 3, 8, (4, 6), (2, 3)),  # head_dim below the block, non-nested segments
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
) -> None:
    _check(batch, seq, heads, head_dim, ws, rs, causal=causal)


def test_chunked_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny chunk budget forces several chunks (segments of every branch inside each).
    monkeypatch.setattr(cudnn, "CHUNK_ELEMENTS", 8 * 2 * 16)
    assert len(cudnn._chunks(2, 44, 2, 16, (4, 8))) > 1
    _check(2, 44, 2, 16, (4, 8), (1, 2), causal=True)


def test_long_range_takes_several_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA caps the grid's second dimension; a small cap here forces the split.
    monkeypatch.setattr(cudnn, "_MAX_GRID_Y", 2)
    assert len(cudnn._gather_launches((16, 32), (1, 2), 2, 0, 100, 1, 2, 16)) > 1
    _check(1, 100, 2, 16, (16, 32), (1, 2), causal=False)
    _check(1, 50, 2, 16, (4, 12), (1, 3), causal=True)


def test_bfloat16() -> None:
    _check(1, 24, 4, 16, (8, 16), (1, 4), causal=True, dtype=torch.bfloat16)


def test_gradient_through_lse() -> None:
    # A loss on the returned LSE (as ring merges use it) takes the triton backward path.
    inp = make_inputs(1, 16, 2, 16, requires_grad=True, seed=3)
    ref_inp = [x.detach().clone().requires_grad_() for x in (inp.q, inp.k, inp.v)]
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, (4, 8), (1, 2), return_lse=True, backend="cudnn"
    )
    ref_out, ref_lse = dilated_attention(
        *ref_inp, (4, 8), (1, 2), return_lse=True, backend="reference"
    )
    (out.sum() + lse.sum()).backward()
    (ref_out.sum() + ref_lse.sum()).backward()
    for name, got, want in zip("qkv", (inp.q, inp.k, inp.v), ref_inp):
        assert got.grad is not None and want.grad is not None
        assert_close_to_reference(got.grad, want.grad.double(), torch.float32, f"d{name}")


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 40),
    heads=st.integers(1, 4),
    branches=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4])), min_size=1, max_size=3
    ),
    causal=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_configs(
    batch: int,
    seq: int,
    heads: int,
    branches: list[tuple[int, int]],
    causal: bool,
    seed: int,
) -> None:
    ws = tuple(m * r * 2 for m, r in branches)
    rs = tuple(r for _, r in branches)
    _check(batch, seq, heads, 16, ws, rs, causal=causal, seed=seed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_p": 0.1}, r"no dropout.*sdpa"),
        ({"key_padding_mask": torch.ones(1, 8, dtype=torch.bool)}, r"key padding.*triton"),
    ],
)
def test_unsupported_calls_name_the_backend_that_can(kwargs: dict[str, object], match: str) -> None:
    inp = make_inputs(1, 8, 2, 16, seed=0)
    with pytest.raises(ValueError, match=match):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], backend="cudnn", **kwargs)  # type: ignore[arg-type]


def test_grouped_query_attention_names_triton() -> None:
    inp = make_inputs(1, 8, 4, 16, kv_heads=2, seed=0)
    with pytest.raises(ValueError, match=r"grouped-query.*triton"):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], backend="cudnn")
