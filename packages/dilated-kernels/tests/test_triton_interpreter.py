"""The fused Triton kernels under ``TRITON_INTERPRET=1`` against the dense float64 judge.

The interpreter is chosen when the kernel module is first imported, so this module sets the
variable before that import and runs only where no CUDA device exists (on a GPU the kernels are
compiled and ``test_gpu.py`` covers them).
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.testing import assert_close_to_reference, check_on_random_inputs, make_inputs
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


def _leaf_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inp = make_inputs(1, 16, 4, 16, kv_heads=2, seed=5)
    return tuple(t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v))  # type: ignore[return-value]


def test_a_second_derivative_is_refused_not_dropped() -> None:
    # A gradient penalty: the gradient's own backward must not silently contribute nothing.
    q, k, v = _leaf_inputs()
    out = dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad
    penalty = dq.square().sum()
    with pytest.raises(
        RuntimeError,
        match=r"backend='triton' computes first derivatives only.*create_graph=True.*"
        r"backend='reference' or 'sdpa'",
    ):
        (out.sum() + penalty).backward()


def test_first_derivatives_are_unchanged_by_the_refusal() -> None:
    q, k, v = _leaf_inputs()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True, backend="triton")
    want = dilated_attention(*ref, [8, 16], [1, 2], is_causal=True, backend="reference")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g, create_graph=True)
    expected = torch.autograd.grad(want, ref, g.double())
    for name, a, b in zip("qkv", got, expected):
        assert_close_to_reference(a.detach(), b, torch.float32, f"d{name}")


def test_torch_func_transforms_name_the_backends_that_support_them() -> None:
    q, k, v = (t.detach() for t in _leaf_inputs())

    def call(x: torch.Tensor, backend: str) -> torch.Tensor:
        return dilated_attention(x, k, v, [8, 16], [1, 2], backend=backend)

    with pytest.raises(
        ValueError, match=r"backend='triton' is not supported under torch\.func\.vmap.*'sdpa'"
    ):
        torch.func.vmap(lambda x: call(x, "triton"))(q[None].expand(3, -1, -1, -1, -1))
    with pytest.raises(
        ValueError, match=r"backend='triton' is not supported under torch\.func\.grad.*'sdpa'"
    ):
        torch.func.grad(lambda x: call(x, "triton").sum())(q)
    # The backends named do run there.
    batched = torch.func.vmap(lambda x: call(x, "sdpa"))(q[None].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(batched[1], call(q, "sdpa"))
    assert torch.func.grad(lambda x: call(x, "reference").sum())(q).shape == q.shape


def test_calls_from_several_threads_are_serialised() -> None:
    # The interpreter keeps a launch's state in globals: unserialised, 4 threads failed with
    # "y >= grid_dim[1]" or computed garbage.
    inputs = [make_inputs(1, 19, 4, 16, kv_heads=2, seed=s) for s in range(4)]
    expected = [
        dilated_attention(x.q, x.k, x.v, [8, 16], [1, 2], is_causal=True, backend="reference")
        for x in inputs
    ]
    results: list[object] = [None] * 4

    def run(i: int) -> None:
        x = inputs[i]
        try:
            for _ in range(2):
                results[i] = dilated_attention(
                    x.q, x.k, x.v, [8, 16], [1, 2], is_causal=True, backend="triton"
                )
        except Exception as err:  # reported below, with its thread
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert isinstance(got, torch.Tensor), got
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
