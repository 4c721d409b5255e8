"""Hostile inputs to dilated-sparse: each is refused with an error naming the argument and the
rule, or computed exactly (judged by the dense float64 reference of ``dilated.core.testing``).

The layout reaches the custom op as a string that holds its content (``layout_key``), so no
number of configs made, freed or used between a forward and its backward can change the
gradient (it did when the op found its config by ``id()``).
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.testing import (
    assert_close_to_reference,
    dense_block_sparse_attention,
    make_inputs,
)
from dilated.core.testing.invalid import (
    InvalidCall,
    assert_honours_check_finite,
    assert_refuses,
    invalid_calls,
)
from dilated.ring.loopback import LoopbackGroup, run_ranks
from dilated.sparse import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingDistributedDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    DistributedBlockSparseDilatedAttention,
    DistributedBlockSparseMultiheadDilatedAttention,
    block_sparse_dilated_attention,
    block_sparse_ring_dilated_attention,
)
from dilated.sparse import layouts as sparse_layouts
from dilated.sparse.functional import attention_by_key, layout_key, resolve

SEGMENTS, RATES = [8, 16], [1, 2]
CFG = SparsePatternConfig("local_window", local_window_size=2, block_size=2)


def _inline_table(seed: int) -> SparsePatternConfig:
    """A config built inline, as in a call, with a seeded random table of its own."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(4, 4, generator=gen) < 0.5
    return SparsePatternConfig(
        "custom", block_size=2, layout=table | torch.eye(4, dtype=torch.bool)
    )


def test_inline_config_gradients_survive_other_calls_before_backward() -> None:
    """A config made inline, then 130 other sparse calls (each with a layout of its own, more
    than every cache holds) before backward: the gradients are those of the layout alone."""
    x = make_inputs(1, 16, 4, 8, dtype=torch.float64, requires_grad=True, seed=1)
    grad = torch.randn(1, 16, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = block_sparse_dilated_attention(
        x.q, x.k, x.v, SEGMENTS, RATES, sparse_config=_inline_table(0), is_causal=True
    )
    gc.collect()  # the inline config is gone, as it is in a training step
    y = make_inputs(1, 16, 4, 8, seed=3)
    for seed in range(1, 131):
        block_sparse_dilated_attention(
            y.q, y.k, y.v, SEGMENTS, RATES, sparse_config=_inline_table(seed)
        )
        if seed % 16 == 0:
            gc.collect()
    out.backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v)]
    want, _ = dense_block_sparse_attention(
        *ref, SEGMENTS, RATES, sparse_config=_inline_table(0), is_causal=True
    )
    want.backward(grad)
    for name, got, expected in zip("qkv", (x.q, x.k, x.v), ref):
        assert got.grad is not None and expected.grad is not None
        assert_close_to_reference(got.grad, expected.grad, torch.float64, f"d{name}")


def test_a_stack_of_70_inline_configs_backprops() -> None:
    """70 layers, each with its own inline layout function (new objects, freed at once): the
    gradients equal those of the same stack whose configs are kept alive."""

    def stack(configs: list[SparsePatternConfig] | None, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(70):
            cfg = (
                SparsePatternConfig(
                    "custom", block_size=2, layout=lambda a, b, i=i: (a - b).abs() <= i % 4
                )
                if configs is None
                else configs[i]
            )
            h = block_sparse_dilated_attention(h, h, h, [4, 8], [1, 2], sparse_config=cfg)
        return h

    kept = [
        SparsePatternConfig("custom", block_size=2, layout=lambda a, b, i=i: (a - b).abs() <= i % 4)
        for i in range(70)
    ]
    x = make_inputs(1, 16, 2, 4, dtype=torch.float64, requires_grad=True, seed=5).q
    (inline,) = torch.autograd.grad(stack(None, x).square().sum(), x)
    (alive,) = torch.autograd.grad(stack(kept, x).square().sum(), x)
    assert torch.isfinite(inline).all()
    torch.testing.assert_close(inline, alive, rtol=0, atol=0)


def test_layout_key_holds_the_content() -> None:
    """Equal layouts give equal keys; a key decodes after every cache is cleared; a key is
    refused for other branches or when it is not a key."""
    first = resolve(CFG, SEGMENTS, RATES)
    copy = SparsePatternConfig("local_window", local_window_size=2, block_size=2)
    assert resolve(copy, SEGMENTS, RATES).key == first.key == layout_key(first.layouts, 2)
    # Custom tables compare by content, although configs ignore them in ==.
    assert _inline_table(0) == _inline_table(1)
    assert (
        resolve(_inline_table(0), SEGMENTS, RATES).key
        != resolve(_inline_table(1), SEGMENTS, RATES).key
    )
    x = make_inputs(1, 16, 4, 8, seed=4)
    want = block_sparse_dilated_attention(x.q, x.k, x.v, SEGMENTS, RATES, sparse_config=CFG)
    sparse_layouts._decode.cache_clear()
    sparse_layouts._resolved.cache_clear()
    got = attention_by_key(x.q, x.k, x.v, SEGMENTS, RATES, layout_key=first.key)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A layout callable that cannot be hashed (it defines == only) is resolved at every call.

    class Band:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a - b).abs() <= 1

    banded = SparsePatternConfig("custom", block_size=2, layout=Band())
    assert resolve(banded, SEGMENTS, RATES).key == first.key
    with pytest.raises(ValueError, match=r"layout_key holds the layouts of the branches"):
        attention_by_key(x.q, x.k, x.v, [16, 16], RATES, layout_key=first.key)
    for bad in ("SparsePatternConfig@7f00", first.key[:-4], first.key.replace(":2:", ":4:", 1)):
        with pytest.raises(ValueError, match=r"layout_key must be a key made by"):
            attention_by_key(x.q, x.k, x.v, SEGMENTS, RATES, layout_key=bad)


_INPUTS = make_inputs(1, 16, 4, 8, kv_heads=2, seed=0)
CALLS = invalid_calls(_INPUTS.q, _INPUTS.k, _INPUTS.v, SEGMENTS, RATES)


@pytest.mark.parametrize("call", CALLS, ids=repr)
def test_every_invalid_call_is_refused_as_in_the_core_op(call: InvalidCall) -> None:
    """The single-process op holds the rules of dilated-core's op (prepare_call, the same
    function): strict booleans (``is_causal=1``, ``return_lse="no"``), branch lists, scale,
    dropout, key padding mask, q/k/v."""
    assert_refuses(functools.partial(block_sparse_dilated_attention, sparse_config=CFG), call)


@pytest.mark.parametrize(
    "call",
    [c for c in CALLS if c.argument in ("is_causal", "return_lse", "check_finite")],
    ids=repr,
)
def test_the_distributed_op_refuses_the_same_booleans(call: InvalidCall) -> None:
    """The distributed op on two loopback ranks: every rank refuses, naming the flag."""

    def rank_fn(rank: int, group: LoopbackGroup) -> None:
        args = list(call.args)
        args[:3] = [t[:, rank * 8 : (rank + 1) * 8] for t in args[:3]]
        attention = functools.partial(
            block_sparse_ring_dilated_attention, sparse_config=CFG, group=group, timeout_s=30
        )
        assert_refuses(
            attention, InvalidCall(call.argument, call.description, tuple(args), call.kwargs)
        )

    run_ranks(rank_fn, 2, timeout_s=60)
    assert_refuses(functools.partial(block_sparse_ring_dilated_attention, sparse_config=CFG), call)


@pytest.mark.parametrize(
    ("function", "rule"),
    [
        (lambda a, b: None, "NoneType None"),
        (lambda a, b: (a - b).abs() * 0.5, "torch.float32 tensor"),
        (lambda a, b: 1 if a == b or b == 0 else 0, "int 1"),
    ],
)
def test_custom_layout_functions_must_return_bools(function: object, rule: str) -> None:
    """None (all-zero output before) or numbers (truth-tested before) are refused at the call
    and at module construction, naming the layout and the rule."""
    cfg = SparsePatternConfig("custom", block_size=2, layout=function)  # type: ignore[arg-type]
    x = make_inputs(1, 16, 4, 8, seed=0)
    match = rf"layout function \(a, b\) -> bool.*{rule}"
    with pytest.raises(ValueError, match=match):
        block_sparse_dilated_attention(x.q, x.k, x.v, SEGMENTS, RATES, sparse_config=cfg)
    with pytest.raises(ValueError, match=match):
        BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=cfg)


def test_every_module_takes_check_finite() -> None:
    """``check_finite`` (documented on every module) reaches the op, single-process and
    distributed (a world of one here; the gloo tests cover two ranks)."""
    from dilated.core.config import (
        DistributedConfig,
        MultiheadConfig,
        RingAttentionConfig,
        RingDistributedConfig,
    )

    x = make_inputs(1, 16, 4, 8, seed=6)
    bad = x.q.clone()
    bad[0, 5, 2, 1] = float("nan")
    e = torch.randn(1, 16, 16)
    e_bad = e.clone()
    e_bad[0, 3, 7] = float("nan")  # the projections carry it into q, k and v
    config = RingDistributedConfig(
        MultiheadConfig(embed_dim=16, num_heads=4),
        RingAttentionConfig(SEGMENTS, RATES),
        DistributedConfig(),
    )
    for attention in (BlockSparseRingDilatedAttention, DistributedBlockSparseDilatedAttention):
        assert_honours_check_finite(
            lambda flag, cls=attention: cls(SEGMENTS, RATES, sparse_config=CFG, check_finite=flag),
            (x.q, x.k, x.v),
            (bad, x.k, x.v),
        )
    for layer in (
        BlockSparseRingMultiheadDilatedAttention,
        DistributedBlockSparseMultiheadDilatedAttention,
    ):
        assert_honours_check_finite(
            lambda flag, cls=layer: cls(
                16, 4, RATES, SEGMENTS, sparse_config=CFG, check_finite=flag
            ),
            (e, e, e),
            (e_bad, e, e),
        )
    assert_honours_check_finite(
        lambda flag: BlockSparseRingDistributedDilatedAttention(
            config, sparse_config=CFG, check_finite=flag
        ),
        (e, e, e),
        (e_bad, e, e),
    )
