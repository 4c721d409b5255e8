"""The fused Triton kernels under ``TRITON_INTERPRET=1`` against the dense float64 judge.

The interpreter is chosen when the kernel module is first imported, so this module sets the
variable before that import and runs only where no CUDA device exists (on a GPU the kernels are
compiled and ``test_gpu.py`` covers them).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.testing import check_on_random_inputs, make_inputs
from dilated.kernels import dilated_attention

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="CUDA present: the compiled kernels are tested in test_gpu.py",
    ),
    pytest.mark.usefixtures("interpret"),
]


def _check(
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
    attention = functools.partial(dilated_attention, return_lse=True, backend="triton")
    check_on_random_inputs(
        attention, 2, seq, heads, head_dim, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=padding, dtype=dtype, seed=seed,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("seq", "heads", "kv_heads", "head_dim", "ws", "rs"),
    [
        (16, 2, 2, 16, (4, 8), (1, 2)),
        (19, 4, 2, 16, (4, 8, 16), (1, 2, 4)),  # odd length, GQA, three branches
        (40, 2, 1, 32, (16, 32), (1, 2)),  # MQA, blocks spanning several segments
        (12, 2, 2, 16, (32,), (8,)),  # more phases than heads: uncovered rows stay 0 / -inf
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_matches_dense(
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
    padding: bool,
) -> None:
    _check(seq, heads, kv_heads, head_dim, ws, rs, causal=causal, padding=padding)


def test_float16_in_interpreter() -> None:
    _check(19, 4, 2, 16, (4, 8), (1, 2), causal=True, padding=False, dtype=torch.float16)


@settings(max_examples=6)
@given(
    seq=st.integers(1, 48),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    branches=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4])), min_size=1, max_size=3
    ),
    causal=st.booleans(),
    padding=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_configs(
    seq: int,
    kv_heads: int,
    group: int,
    branches: list[tuple[int, int]],
    causal: bool,
    padding: bool,
    seed: int,
) -> None:
    ws = tuple(m * r * 2 for m, r in branches)
    rs = tuple(r for _, r in branches)
    _check(seq, kv_heads * group, kv_heads, 16, ws, rs, causal=causal, padding=padding, seed=seed)


def test_dropout_names_other_backends() -> None:
    inp = make_inputs(1, 8, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"sdpa.*reference"):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], dropout_p=0.1, backend="triton")
