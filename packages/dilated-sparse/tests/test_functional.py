"""block_sparse_dilated_attention against the dense float64 judge of dilated.core.testing.

Tolerances are those of the judge ([`tolerance`][dilated.core.testing.tolerance]): relative
1e-4 for float32/float64, 2e-2 for 16-bit, on the output, the LSE and the q/k/v gradients.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core import SparsePatternConfig, dilated_attention
from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_block_sparse_attention,
    make_inputs,
)
from dilated.sparse import block_sparse_dilated_attention

LAYOUTS = {
    "dense": SparsePatternConfig("dense", block_size=2),
    "local_window": SparsePatternConfig("local_window", local_window_size=2, block_size=2),
    "local_window_ratio": SparsePatternConfig("local_window", sparsity_ratio=0.3, block_size=3),
    "global_local": SparsePatternConfig(
        "global_local", local_window_size=2, global_tokens=3, block_size=2
    ),
    "dilated_sparse": SparsePatternConfig("dilated_sparse", block_size=2),
    "custom_tensor": SparsePatternConfig(
        "custom",
        block_size=2,
        layout=torch.tensor([[i % 3 == j % 2 for j in range(12)] for i in range(12)]),
    ),
    "custom_function": SparsePatternConfig(
        "custom", block_size=3, layout=lambda a, b: a == b or (a + b) % 3 == 1
    ),
}

# (seq, heads, kv_heads, padding): a short last segment in every branch, grouped-query attention
# with strided and with gathered key/value heads (rate 3 over groups of 4), one head per phase.
SHAPES = [(37, 4, 4, False), (32, 4, 2, True), (48, 8, 2, False), (24, 2, 2, False)]
SEGMENTS, RATES = [8, 16, 24], [1, 2, 3]


def _check(cfg: SparsePatternConfig, **kwargs: object) -> None:
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("seq", "heads", "kv_heads", "padding"), SHAPES)
def test_every_layout_matches_the_judge(
    name: str, is_causal: bool, seq: int, heads: int, kv_heads: int, padding: bool
) -> None:
    _check(
        LAYOUTS[name],
        batch=2,
        seq=seq,
        heads=heads,
        head_dim=8,
        segment_lengths=SEGMENTS,
        dilation_rates=RATES,
        kv_heads=kv_heads,
        is_causal=is_causal,
        padding=padding,
        seed=seq,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    _check(
        LAYOUTS["global_local"],
        batch=1,
        seq=32,
        heads=4,
        head_dim=16,
        segment_lengths=[16, 32],
        dilation_rates=[1, 4],
        is_causal=True,
        dtype=dtype,
    )


def test_sequence_shorter_than_every_segment() -> None:
    _check(
        LAYOUTS["dilated_sparse"],
        batch=1,
        seq=11,
        heads=2,
        head_dim=8,
        segment_lengths=[16, 32],
        dilation_rates=[1, 2],
    )


def test_dense_layout_is_the_plain_dilated_op() -> None:
    x = make_inputs(2, 40, 4, 8, kv_heads=2, padding=True, seed=5)
    for causal in (False, True):
        got = block_sparse_dilated_attention(
            x.q, x.k, x.v, SEGMENTS, RATES, sparse_config=SparsePatternConfig("dense"),
            is_causal=causal, key_padding_mask=x.key_padding_mask, return_lse=True,
        )  # fmt: skip
        want = dilated_attention(
            x.q, x.k, x.v, SEGMENTS, RATES, is_causal=causal,
            key_padding_mask=x.key_padding_mask, return_lse=True,
        )  # fmt: skip
        assert_close_to_reference(got[0], want[0], torch.float32)
        finite = torch.isfinite(want[1])
        assert torch.equal(finite, torch.isfinite(got[1]))
        assert_close_to_reference(got[1][finite], want[1][finite], torch.float32, "lse")


def test_uncovered_rows_are_zero_with_finite_gradients() -> None:
    # Block 1 of every sub-problem attends nothing and is attended by nothing.
    table = torch.tensor([[True, False, True], [False, False, False], [True, False, True]])
    cfg = SparsePatternConfig("custom", block_size=4, layout=table)
    x = make_inputs(1, 24, 2, 8, requires_grad=True, seed=1)
    out, lse = block_sparse_dilated_attention(
        x.q, x.k, x.v, [12], [1], sparse_config=cfg, return_lse=True
    )
    rows = torch.tensor([4, 5, 6, 7, 16, 17, 18, 19])
    assert torch.equal(out[0, rows], torch.zeros_like(out[0, rows]))
    assert torch.isinf(lse[0][:, rows]).all() and torch.isfinite(lse[0][:, :4]).all()
    out.square().sum().backward()
    for t in (x.q, x.k, x.v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[0, rows], torch.zeros_like(t.grad[0, rows]))
    _check(cfg, batch=1, seq=24, heads=2, head_dim=8, segment_lengths=[12], dilation_rates=[1])


def test_dropout_backward_replays_the_forward_masks() -> None:
    cfg = LAYOUTS["local_window"]
    x = make_inputs(1, 12, 2, 2, dtype=torch.float64, requires_grad=True, seed=2)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        return block_sparse_dilated_attention(
            q, k, v, [8, 16], [1, 2], sparse_config=cfg, dropout_p=0.3, is_causal=True
        )

    assert torch.autograd.gradcheck(f, (x.q, x.k, x.v), eps=1e-6, atol=1e-6, fast_mode=True)
    torch.manual_seed(0)
    a = f(x.q, x.k, x.v)
    torch.manual_seed(1)
    b = block_sparse_dilated_attention(
        x.q, x.k, x.v, [8, 16], [1, 2], sparse_config=cfg, dropout_p=0.3, is_causal=True
    )
    assert not torch.equal(a, b)  # the seed really changes the masks


def test_bad_arguments() -> None:
    x = make_inputs(1, 8, 2, 4)
    with pytest.raises(TypeError, match="sparse_config"):
        block_sparse_dilated_attention(x.q, x.k, x.v, [4], [1], sparse_config="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dilation_rates"):
        block_sparse_dilated_attention(
            x.q, x.k, x.v, [4], [3], sparse_config=SparsePatternConfig("dense")
        )
    small = SparsePatternConfig("custom", block_size=1, layout=torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout must be at least"):
        block_sparse_dilated_attention(x.q, x.k, x.v, [4], [1], sparse_config=small)


@st.composite
def _configs(draw: st.DrawFn) -> tuple[SparsePatternConfig, list[int], list[int]]:
    rates = draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3))
    segments = [r * draw(st.integers(1, 8)) for r in rates]
    block = draw(st.integers(1, 4))
    kind = draw(
        st.sampled_from(["dense", "local_window", "global_local", "dilated_sparse", "custom"])
    )
    if kind == "custom":
        nb = max(-(-(w // r) // block) for w, r in zip(segments, rates))
        bits = draw(st.lists(st.booleans(), min_size=nb * nb, max_size=nb * nb))
        table = torch.tensor(bits, dtype=torch.bool).reshape(nb, nb)
        return SparsePatternConfig("custom", block_size=block, layout=table), segments, rates
    if kind in ("local_window", "global_local"):
        extra = {"global_tokens": draw(st.integers(1, 6))} if kind == "global_local" else {}
        if draw(st.booleans()):
            return (
                SparsePatternConfig(
                    kind, block_size=block, sparsity_ratio=draw(st.floats(0.05, 1.0)), **extra
                ),
                segments,
                rates,
            )
        return (
            SparsePatternConfig(
                kind, block_size=block, local_window_size=draw(st.integers(0, 8)), **extra
            ),
            segments,
            rates,
        )
    return SparsePatternConfig(kind, block_size=block), segments, rates


@given(
    config=_configs(),
    seq=st.integers(1, 30),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 4), (4, 2), (6, 3)]),
    is_causal=st.booleans(),
    padding=st.booleans(),
    batch=st.integers(1, 2),
)
def test_random_layouts_and_configurations(
    config: tuple[SparsePatternConfig, list[int], list[int]],
    seq: int,
    heads: tuple[int, int],
    is_causal: bool,
    padding: bool,
    batch: int,
) -> None:
    cfg, segments, rates = config
    _check(
        cfg,
        batch=batch,
        seq=seq,
        heads=heads[0],
        head_dim=4,
        segment_lengths=segments,
        dilation_rates=rates,
        kv_heads=heads[1],
        is_causal=is_causal,
        padding=padding,
    )


def test_every_way_of_batching_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # Longer segments than above, so that stacks, segments and phases all have several members:
    # index dims in the head slot (one head per phase), real heads looped so that an index dim
    # takes the head slot, and leftover index dims looped.
    from dilated.sparse import engine

    seen = {"head_loop": 0, "head_slot": 0, "loop": 0}
    steps = engine._steps

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        plan = steps(*args, **kwargs)  # type: ignore[arg-type]
        for step in plan.steps:
            seen["head_loop"] += step.head is not None
            seen["head_slot"] += step.plan.head_slot is not None and step.head is None
            seen["loop"] += bool(step.loop)
        return plan

    monkeypatch.setattr(engine, "_steps", spy)
    for cfg in (LAYOUTS["local_window"], SparsePatternConfig("dilated_sparse", block_size=1)):
        for batch, seq, heads, kv_heads, ws, rs in (
            (1, 192, 4, 4, [64, 192], [1, 3]),
            (2, 128, 4, 2, [64], [2]),
            (1, 96, 2, 2, [32, 96], [1, 4]),
        ):
            _check(
                cfg, batch=batch, seq=seq, heads=heads, head_dim=4, segment_lengths=ws,
                dilation_rates=rs, kv_heads=kv_heads, is_causal=seq == 128, seed=seq,
            )  # fmt: skip
    assert all(count > 0 for count in seen.values()), seen


def test_non_contiguous_inputs() -> None:
    # (batch, heads, seq, head_dim) tensors seen as (batch, seq, heads, head_dim): views are cut
    # from the tensors' own strides, so nothing needs to be contiguous.
    cfg = LAYOUTS["global_local"]
    base = make_inputs(2, 4, 48, 8, seed=6)  # drawn as (batch, heads, seq, head_dim)
    q, k, v = (t.transpose(1, 2) for t in (base.q, base.k, base.v))
    assert not q.is_contiguous()
    got = block_sparse_dilated_attention(
        q, k, v, SEGMENTS, RATES, sparse_config=cfg, is_causal=True
    )
    want = block_sparse_dilated_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), SEGMENTS, RATES, sparse_config=cfg,
        is_causal=True,
    )  # fmt: skip
    # A strided view and its contiguous copy reach BLAS with different layouts, whose float32
    # sums may round differently (2.4e-7 seen on one x86 machine): equal to float32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_the_head_slot() -> None:
    from dilated.core.settings import use_settings

    with use_settings(sparse_head_slot=False):
        _check(
            LAYOUTS["local_window"], batch=1, seq=96, heads=2, head_dim=4,
            segment_lengths=[32, 96], dilation_rates=[1, 4], is_causal=True,
        )  # fmt: skip
