"""Bad input: every rule gives a ValueError that names the argument and the rule."""

from __future__ import annotations

import math

import pytest
import torch

from dilated.core import dilated_attention
from dilated.core.checks import check_branches, check_positive_number, first_derivative_only


def _qkv(
    b: int = 1, n: int = 8, h: int = 2, d: int = 4, hkv: int | None = None
) -> tuple[torch.Tensor, ...]:
    hkv = h if hkv is None else hkv
    return torch.randn(b, n, h, d), torch.randn(b, n, hkv, d), torch.randn(b, n, hkv, d)


GOOD = ([4, 8], [1, 2])


@pytest.mark.parametrize(
    ("ws", "rs", "match"),
    [
        ([], [], "segment_lengths must not be empty"),
        ([4], [], "dilation_rates must not be empty"),
        ([4, 8], [1], "same length"),
        ([4, 6], [1, 4], r"segment_lengths\[1\]=6 must be a multiple of dilation_rates\[1\]=4"),
        ([0], [1], r"segment_lengths\[0\] must be a positive integer"),
        ([4], [-2], r"dilation_rates\[0\] must be a positive integer"),
        ([4.0], [1], r"segment_lengths\[0\] must be a positive integer"),
        ([True], [1], r"segment_lengths\[0\] must be a positive integer"),
        ("48", [1, 1], "segment_lengths must be a sequence"),
    ],
)
def test_branch_rules(ws: list[int], rs: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dilated_attention(*_qkv(), ws, rs)


def test_rank_and_shapes() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have rank 4"):
        dilated_attention(q[0], k, v, *GOOD)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        dilated_attention(q, k, v[..., :2], *GOOD)
    with pytest.raises(ValueError, match="agree in batch, seq and head_dim"):
        dilated_attention(q, k[:, :4], v[:, :4], *GOOD)
    with pytest.raises(
        ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"
    ):
        dilated_attention(*_qkv(h=3, hkv=2), *GOOD)
    with pytest.raises(ValueError, match="empty dimension"):
        dilated_attention(*_qkv(n=0), *GOOD)
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor"):
        dilated_attention(q, k.tolist(), v, *GOOD)  # type: ignore[arg-type]


def test_dtypes_and_devices() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="share one dtype"):
        dilated_attention(q, k.double(), v.double(), *GOOD)
    with pytest.raises(ValueError, match="q must be float16, bfloat16, float32 or float64"):
        dilated_attention(q.long(), k, v, *GOOD)
    with pytest.raises(ValueError, match="on one device"):
        dilated_attention(q, k.to("meta"), v.to("meta"), *GOOD)


def test_scale_dropout_mask() -> None:
    q, k, v = _qkv()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            dilated_attention(q, k, v, *GOOD, scale=bad)
    for p in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=r"dropout_p must be a probability in \[0, 1\)"):
            dilated_attention(q, k, v, *GOOD, dropout_p=p)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        dilated_attention(q, k, v, *GOOD, key_padding_mask=torch.ones(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"only -inf .ignored key. and 0 .attended key."):
        dilated_attention(q, k, v, *GOOD, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seq\)"):
        dilated_attention(q, k, v, *GOOD, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_finite_inputs_raise_when_checked(which: str, bad: float) -> None:
    tensors = dict(zip("qkv", _qkv()))
    tensors[which][0, 3, 1, 2] = bad
    with pytest.raises(ValueError, match=f"{which} holds NaN or Inf"):
        dilated_attention(tensors["q"], tensors["k"], tensors["v"], *GOOD, check_finite=True)


@pytest.mark.parametrize("check_finite", [None, False])
def test_non_finite_propagates_when_unchecked(
    check_finite: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unchecked (the default) a NaN key poisons exactly the queries that can see it."""
    monkeypatch.delenv("DILATED_CHECK_FINITE", raising=False)
    q, k, v = _qkv(n=8, h=1)
    k[0, 5, 0, 0] = math.nan
    out = dilated_attention(q, k, v, [4], [1], check_finite=check_finite)
    assert torch.isnan(out[0, 4:]).all()
    assert torch.isfinite(out[0, :4]).all()


@pytest.mark.parametrize(
    ("ws", "rs", "match"),
    [
        (
            [8, 2**62],
            [1, 2**62],
            r"segment_lengths\[1\]=4611686018427387904 must be at most 2\*\*40",
        ),
        ([8, 8], [1, 2**62], r"dilation_rates\[1\]=4611686018427387904 must be at most 2\*\*40"),
        ([2**63], [2**62], r"segment_lengths\[0\]=9223372036854775808 must be at most 2\*\*40"),
    ],
)
def test_branch_entries_are_bounded(ws: list[int], rs: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dilated_attention(*_qkv(), ws, rs)


def test_largest_branch_entry_is_one_segment() -> None:
    # At the bound a segment is as good as the whole sequence: the same result as w = seq.
    q, k, v = _qkv(n=8, h=1)
    got = dilated_attention(q, k, v, [2**40], [2**40], is_causal=True)
    want = dilated_attention(q, k, v, [8], [8], is_causal=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_sparse_inputs_name_the_layout_rule(which: str) -> None:
    tensors = dict(zip("qkv", _qkv()))
    tensors[which] = tensors[which].to_sparse()
    with pytest.raises(
        ValueError, match=rf"{which} must be a dense tensor \(layout torch\.strided\)"
    ):
        dilated_attention(tensors["q"], tensors["k"], tensors["v"], *GOOD)
    mask = torch.ones(1, 8, dtype=torch.bool).to_sparse()
    with pytest.raises(ValueError, match=r"key_padding_mask must be a dense tensor"):
        dilated_attention(*_qkv(), *GOOD, key_padding_mask=mask)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 0, -1.0, "1", True, None, [1.0]])
def test_positive_number_rule(bad: object) -> None:
    with pytest.raises(ValueError, match=r"base must be a finite positive number, got"):
        check_positive_number("base", bad)
    assert check_positive_number("base", 10000) == 10000.0


def test_first_derivative_only_refuses_a_second_derivative() -> None:
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fixed = torch.full((3,), 2.0, dtype=torch.float64)  # a gradient computed without history
    with torch.no_grad():  # a plain backward(): unchanged
        assert first_derivative_only("op", "other", (fixed, None))[0] is fixed
    with torch.enable_grad():  # create_graph=True: an alias whose backward refuses
        alias, none = first_derivative_only("the op", "the other op", (fixed, None))
    assert none is None and alias is not None and alias.grad_fn is not None
    torch.testing.assert_close(alias, fixed)
    with pytest.raises(RuntimeError, match=r"the op computes first derivatives only.*the other op"):
        ((alias * x).sum() + x.sum()).backward()


def test_branch_lists_that_passed_are_looked_up_but_lookalikes_are_checked() -> None:
    """A list of ints that passed once is not checked again; a bool, a float or a numpy int
    equal to a cached entry is still checked, and refused as the rules say."""
    np = pytest.importorskip("numpy")
    assert check_branches([8, 16], [1, 2]) == ((8, 16), (1, 2))
    assert check_branches((8, 16), [1, 2]) == ((8, 16), (1, 2))  # looked up
    with pytest.raises(ValueError, match=r"dilation_rates\[0\]"):
        check_branches([8, 16], [True, 2])
    with pytest.raises(ValueError, match=r"segment_lengths\[1\]"):
        check_branches([8, 16.0], [1, 2])
    with pytest.raises(ValueError, match=r"segment_lengths\[0\]"):
        check_branches([np.int64(8), 16], [1, 2])
    with pytest.raises(ValueError, match=r"multiple of dilation_rates\[1\]"):
        check_branches([8, 16], [1, 3])
