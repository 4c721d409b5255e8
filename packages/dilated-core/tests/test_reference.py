"""The reference op against the dense float64 judge, forward, LSE and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core import dilated_attention
from dilated.core.reference import attention_output, attention_with_lse
from dilated.core.testing import (
    assert_close_to_reference,
    assert_matches_reference,
    dense_dilated_attention,
    make_inputs,
    tolerance,
)


def _check(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ws: list[int],
    rs: list[int],
    *,
    dtype: torch.dtype,
    causal: bool,
    padding: bool,
    seed: int,
) -> None:
    inp = make_inputs(
        batch,
        seq,
        heads,
        head_dim,
        kv_heads=kv_heads,
        dtype=dtype,
        padding=padding,
        requires_grad=True,
        seed=seed,
    )
    attention = functools.partial(dilated_attention, return_lse=True)
    assert_matches_reference(attention, inp, ws, rs, is_causal=causal, seed=seed)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    n_branches = draw(st.integers(1, 3))
    rs = [draw(st.sampled_from([1, 2, 3, 4])) for _ in range(n_branches)]
    ws = [r * draw(st.integers(1, 6)) for r in rs]
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    return {
        "batch": draw(st.integers(1, 2)),
        "seq": draw(st.integers(1, 40)),
        "heads": kv_heads * draw(st.sampled_from([1, 2, 4])),
        "kv_heads": kv_heads,
        "head_dim": draw(st.sampled_from([4, 8])),
        "ws": ws,
        "rs": rs,
        "causal": draw(st.booleans()),
        "padding": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(configs())
def test_matches_dense_reference_float64(cfg: dict[str, object]) -> None:
    _check(dtype=torch.float64, **cfg)  # type: ignore[arg-type]


@given(configs())
def test_matches_dense_reference_float32(cfg: dict[str, object]) -> None:
    _check(dtype=torch.float32, **cfg)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("seq", "ws", "rs"), [(64, [16, 32], [1, 2]), (53, [8, 24, 48], [1, 3, 6])]
)
def test_half_precision(
    dtype: torch.dtype, causal: bool, seq: int, ws: list[int], rs: list[int]
) -> None:
    _check(2, seq, 4, 2, 16, ws, rs, dtype=dtype, causal=causal, padding=True, seed=seq)


def test_worked_example() -> None:
    """A worked example: seq 16, 2 heads, segments [4, 8], rates [1, 2], uniform scores."""
    seq, d = 16, 4
    q = torch.zeros(1, seq, 2, d, dtype=torch.float64)  # equal scores: uniform weights
    k = torch.zeros(1, seq, 2, d, dtype=torch.float64)
    v = torch.arange(seq, dtype=torch.float64)[None, :, None, None].expand(1, seq, 2, d).clone()
    out, lse = dilated_attention(q, k, v, [4, 8], [1, 2], return_lse=True)
    # Head 0, query 6: branch 0 sees keys 4..7 (4 keys); branch 1 (phase 0) sees 0, 2, 4, 6.
    expected_h0 = (4 + 5 + 6 + 7 + 0 + 2 + 4 + 6) / 8
    assert out[0, 6, 0, 0].item() == pytest.approx(expected_h0)
    # Head 1, query 5: branch 0 keys 4..7, branch 1 (phase 1) keys 1, 3, 5, 7.
    assert out[0, 5, 1, 0].item() == pytest.approx((4 + 5 + 6 + 7 + 1 + 3 + 5 + 7) / 8)
    # Head 1, query 6 takes no part in branch 1: branch 0 alone, keys 4..7.
    assert out[0, 6, 1, 0].item() == pytest.approx((4 + 5 + 6 + 7) / 4)
    assert lse[0, 1, 6].item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert lse[0, 0, 6].item() == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_uncovered_position_is_zero_with_minus_inf_lse() -> None:
    """With one branch of rate 2 and one head, odd positions see nothing: out 0, lse -inf."""
    inp = make_inputs(1, 10, 1, 8, dtype=torch.float32, requires_grad=True, seed=3)
    out, lse = dilated_attention(inp.q, inp.k, inp.v, [4], [2], return_lse=True)
    assert torch.equal(out[:, 1::2], torch.zeros_like(out[:, 1::2]))
    assert torch.isneginf(lse[:, :, 1::2]).all()
    assert torch.isfinite(lse[:, :, 0::2]).all()
    out.sum().backward()
    assert inp.q.grad is not None and torch.isfinite(inp.q.grad).all()
    assert torch.equal(inp.q.grad[:, 1::2], torch.zeros_like(inp.q.grad[:, 1::2]))


def test_fully_padded_keys_give_zero_not_nan() -> None:
    inp = make_inputs(2, 12, 2, 8, requires_grad=True, seed=5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1] = True  # the second sequence has no real key at all
    out = dilated_attention(inp.q, inp.k, inp.v, [4, 12], [1, 2], key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert inp.k.grad is not None and torch.isfinite(inp.k.grad).all()


def test_scale_argument() -> None:
    inp = make_inputs(1, 24, 2, 8, dtype=torch.float64, seed=7)
    out = dilated_attention(inp.q, inp.k, inp.v, [8, 24], [1, 3], scale=0.3)
    ref, _ = dense_dilated_attention(inp.q, inp.k, inp.v, [8, 24], [1, 3], scale=0.3)
    assert_close_to_reference(out, ref, torch.float64)
    default = dilated_attention(inp.q, inp.k, inp.v, [8, 24], [1, 3])
    assert not torch.allclose(out, default)


def test_dropout_is_unbiased_and_off_at_zero() -> None:
    inp = make_inputs(1, 16, 2, 4, dtype=torch.float64, seed=11)
    args = (inp.q, inp.k, inp.v, [8, 16], [1, 2])
    plain = dilated_attention(*args)
    assert torch.equal(dilated_attention(*args, dropout_p=0.0), plain)
    torch.manual_seed(0)
    samples = torch.stack([dilated_attention(*args, dropout_p=0.3) for _ in range(3000)])
    assert not torch.allclose(samples[0], plain)
    # Inverted dropout keeps the expectation: the sample mean approaches the plain output.
    assert (samples.mean(0) - plain).abs().max().item() < 0.1 * plain.abs().max().item()


def test_linear_memory_no_seq_by_seq_tensor() -> None:
    """No intermediate of the reference grows as seq^2 (largest is seq * w / r per head)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = 0

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    seq, heads, d = 1024, 2, 4
    inp = make_inputs(1, seq, heads, d, seed=0)
    with Track():
        dilated_attention(inp.q, inp.k, inp.v, [32, 64], [1, 2], check_finite=False)
    assert largest <= seq * 32 * heads  # dense would be seq * seq * heads = 2M elements
    assert tolerance(torch.float32) == 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_output_is_the_output_of_attention_with_lse(dtype: torch.dtype) -> None:
    """The LSE-free form (decoding) against a softmax written out, a row with no allowed key
    included (0 there)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 4, 6, 8, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.rand(2, 3, 4, 6, generator=g) < 0.6  # per leading index, over the keys
    mask[0, 1, 2] = False
    got = attention_output(q, k, v, 0.3, key_mask=mask)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask[..., None, :], float("-inf"))
    want = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v
    torch.testing.assert_close(got, want)
    assert torch.equal(got[0, 1, 2], torch.zeros_like(got[0, 1, 2]))
    with_lse = attention_with_lse(q, k, v, 0.3, key_mask=mask)[0]
    torch.testing.assert_close(got, with_lse, rtol=0, atol=0)
