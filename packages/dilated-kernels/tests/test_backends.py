"""The sdpa and reference backends against the dense float64 judge of dilated.core.testing."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core.testing import check_on_random_inputs, make_inputs
from dilated.kernels import dilated_attention

BACKENDS = ["sdpa", "reference"]

CASES = [
    # seq, heads, kv_heads, head_dim, segments, rates
    (16, 2, 2, 8, (4, 8), (1, 2)),
    (24, 4, 2, 16, (8, 16), (1, 4)),
    (19, 4, 1, 8, (4, 8, 16), (1, 2, 4)),  # odd length: partial last segments, MQA
    (7, 3, 3, 4, (16,), (2,)),  # seq shorter than the segment
    (32, 2, 2, 32, (32,), (8,)),  # more phases than heads: some positions uncovered
]


def _check(
    backend: str,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    *,
    causal: bool,
    padding: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend=backend)
    check_on_random_inputs(
        attention, 2, seq, heads, head_dim, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=padding, dtype=dtype, seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_matches_dense(backend: str, case: tuple, causal: bool, padding: bool) -> None:
    _check(backend, *case, causal=causal, padding=padding)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend: str, dtype: torch.dtype) -> None:
    _check(backend, 24, 4, 2, 16, (8, 16), (1, 4), causal=True, padding=False, dtype=dtype)


@given(
    seq=st.integers(1, 40),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8]),
    branches=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4])), min_size=1, max_size=3
    ),
    causal=st.booleans(),
    padding=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_sdpa_random_configs(
    seq: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    branches: list[tuple[int, int]],
    causal: bool,
    padding: bool,
    seed: int,
) -> None:
    ws = tuple(m * r * 2 for m, r in branches)
    rs = tuple(r for _, r in branches)
    _check(
        "sdpa",
        seq,
        kv_heads * group,
        kv_heads,
        head_dim,
        ws,
        rs,
        causal=causal,
        padding=padding,
        seed=seed,
    )


def test_dropout_runs_on_sdpa_and_reference() -> None:
    inp = make_inputs(1, 16, 2, 8, seed=0)
    for backend in BACKENDS:
        torch.manual_seed(0)
        out = dilated_attention(inp.q, inp.k, inp.v, [8], [1], dropout_p=0.5, backend=backend)
        no_drop = dilated_attention(inp.q, inp.k, inp.v, [8], [1], backend=backend)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, no_drop)
