"""The modules, the factory and the registry kind of dilated-sparse."""

from __future__ import annotations

import pytest
import torch

from dilated.core import (
    DilatedAttentionConfig,
    MultiheadConfig,
    SparsePatternConfig,
    create_dilated_attention,
    create_multihead_dilated_attention,
    get_implementation,
)
from dilated.core.testing import assert_close_to_reference, make_inputs
from dilated.sparse import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    DistributedBlockSparseDilatedAttention,
    DistributedBlockSparseMultiheadDilatedAttention,
    block_sparse_dilated_attention,
    create_block_sparse_multihead_attention,
)

CFG = SparsePatternConfig("global_local", local_window_size=4, global_tokens=4, block_size=4)


def test_module_computes_the_functional() -> None:
    x = make_inputs(2, 40, 4, 8, kv_heads=2, padding=True, seed=0)
    m = BlockSparseRingDilatedAttention([16, 32], [1, 2], sparse_config=CFG, is_causal=True)
    got = m(x.q, x.k, x.v, key_padding_mask=x.key_padding_mask)
    want = block_sparse_dilated_attention(
        x.q, x.k, x.v, [16, 32], [1, 2], sparse_config=CFG, is_causal=True,
        key_padding_mask=x.key_padding_mask,
    )  # fmt: skip
    assert torch.equal(got, want)
    by_keywords = BlockSparseRingDilatedAttention(
        DilatedAttentionConfig([16, 32], [1, 2], is_causal=True),
        pattern_type="global_local",
        local_window_size=4,
        global_tokens=4,
        block_size=4,
    )
    assert by_keywords.sparse_config == CFG
    assert "nb=4" in repr(m) and "W=1" in m.describe()


def test_multihead_module_factory_and_registry() -> None:
    mc, ac = MultiheadConfig(embed_dim=32, num_heads=4), DilatedAttentionConfig([16, 32], [1, 2])
    m = BlockSparseRingMultiheadDilatedAttention(mc, ac, sparse_config=CFG)
    assert isinstance(m.attention, BlockSparseRingDilatedAttention)
    assert m.attention.sparse_config is CFG
    x = torch.randn(2, 40, 32)
    out, weights = m(x, x, x)
    assert out.shape == x.shape and weights is None
    out.sum().backward()
    assert m.q_proj.weight.grad is not None
    seed = create_block_sparse_multihead_attention(64, 8, 0.5, "local_window", block_size=16)
    assert seed.sparse_config == SparsePatternConfig(
        "local_window", sparsity_ratio=0.5, block_size=16
    )
    assert seed.multihead_config.num_heads == 8
    assert get_implementation("block_sparse").multihead is BlockSparseRingMultiheadDilatedAttention
    mh = create_multihead_dilated_attention(
        "block_sparse", embed_dim=32, num_heads=4, segment_lengths=[16], dilation_rates=[1],
        pattern_type="dilated_sparse", block_size=2,
    )  # fmt: skip
    assert isinstance(mh, BlockSparseRingMultiheadDilatedAttention)
    one = create_dilated_attention("block_sparse", segment_lengths=[16], dilation_rates=[1])
    assert one.sparse_config == SparsePatternConfig()
    ring = get_implementation("block_sparse_ring")
    assert ring.distributed and ring.attention is DistributedBlockSparseDilatedAttention
    assert ring.multihead is DistributedBlockSparseMultiheadDilatedAttention
    # A sparse layout is another function than dilated attention: "auto" never picks it.
    assert get_implementation("auto", "cpu").name != "block_sparse"


def test_assigning_a_layout_takes_effect() -> None:
    x = make_inputs(1, 40, 4, 8, seed=7)
    other = SparsePatternConfig("local_window", local_window_size=8, block_size=4)
    m = BlockSparseRingDilatedAttention([16, 32], [1, 2], sparse_config=CFG)
    before = m(x.q, x.k, x.v)
    m.sparse_config = other
    want = block_sparse_dilated_attention(x.q, x.k, x.v, [16, 32], [1, 2], sparse_config=other)
    after = m(x.q, x.k, x.v)
    assert torch.equal(after, want) and not torch.equal(after, before)
    mh = BlockSparseRingMultiheadDilatedAttention(32, 4, [1, 2], [16, 32], sparse_config=CFG)
    mh.sparse_config = other
    assert mh.attention.sparse_config is other and "W=2" in mh.describe()
    with pytest.raises(TypeError, match="sparse_config"):
        m.sparse_config = None  # type: ignore[assignment]
    wrong = SparsePatternConfig("custom", block_size=4, layout=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout must be at least"):
        mh.sparse_config = wrong
    assert mh.sparse_config is other  # a rejected layout leaves the last one in place


def test_dense_module_matches_the_standard_module() -> None:
    x = make_inputs(1, 33, 4, 8, seed=4)
    sparse = BlockSparseRingDilatedAttention([8, 16], [1, 2], pattern_type="dense")
    standard = create_dilated_attention("standard", segment_lengths=[8, 16], dilation_rates=[1, 2])
    assert_close_to_reference(sparse(x.q, x.k, x.v), standard(x.q, x.k, x.v), torch.float32)


def test_bad_module_arguments() -> None:
    with pytest.raises(ValueError, match="either sparse_config or its fields"):
        BlockSparseRingDilatedAttention([16], [1], sparse_config=CFG, block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseRingDilatedAttention([16], [1], block_size=0)
    with pytest.raises(ValueError, match="local_window_size"):
        create_block_sparse_multihead_attention(32, 4, local_window_size=-2)
    with pytest.raises(TypeError, match="sparse_config"):
        BlockSparseRingDilatedAttention([16], [1], sparse_config={"block_size": 8})  # type: ignore[arg-type]
    wrong = SparsePatternConfig("custom", block_size=4, layout=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout must be at least"):
        BlockSparseRingDilatedAttention([32], [1], sparse_config=wrong)


def test_op_passes_opcheck() -> None:
    from dilated.sparse.functional import resolve

    x = make_inputs(1, 24, 4, 8, kv_heads=2, padding=True, requires_grad=True, seed=7)
    key = resolve(CFG, [8, 16], [1, 2]).key
    args = (x.q, x.k, x.v, x.key_padding_mask, None, key, [8, 16], [1, 2], 0.35, True, 0.0)
    torch.library.opcheck(torch.ops.dilated_sparse.attention.default, args)


def test_modules_compile_with_fullgraph() -> None:
    """The layout reaches the custom op as a string: no graph break, compiled equals eager."""
    x = make_inputs(2, 40, 4, 8, kv_heads=2, requires_grad=True, seed=8)
    attn = BlockSparseRingDilatedAttention([16, 32], [1, 2], sparse_config=CFG, is_causal=True)
    eager = attn(x.q, x.k, x.v)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")(x.q, x.k, x.v)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    for a, e in zip(
        torch.autograd.grad(compiled, (x.q, x.k, x.v), g),
        torch.autograd.grad(eager, (x.q, x.k, x.v), g),
    ):
        torch.testing.assert_close(a, e)
    mha = BlockSparseRingMultiheadDilatedAttention(32, 4, [1, 2], [16, 32], sparse_config=CFG)
    y = torch.randn(1, 32, 32)
    out, _ = torch.compile(mha, fullgraph=True, backend="aot_eager")(y, y, y)
    torch.testing.assert_close(out, mha(y, y, y)[0])


LAYOUT_SETTINGS = (
    "check_finite", "sparse_config", "pattern_type", "sparsity_ratio", "block_size",
    "local_window_size", "global_tokens", "layout",
)  # fmt: skip


def test_the_settings_of_the_sparse_attentions() -> None:
    from dilated.core.base import attention_settings

    assert attention_settings(BlockSparseRingDilatedAttention) == LAYOUT_SETTINGS
    sharded = attention_settings(DistributedBlockSparseDilatedAttention)
    assert sharded == ("group", "timeout_s", *LAYOUT_SETTINGS)


def test_sharded_multihead_builds_its_attention_with_group_timeout_and_layout() -> None:
    from dilated.ring.loopback import run_ranks

    group = run_ranks(lambda rank, g: g, 1)[0]
    mh = DistributedBlockSparseMultiheadDilatedAttention(
        32, 4, [1, 2], [16, 32], group=group, timeout_s=9.0, pattern_type="local_window",
        local_window_size=8, block_size=4, check_finite=True,
    )  # fmt: skip
    inner = mh.attention
    assert isinstance(inner, DistributedBlockSparseDilatedAttention)
    assert (inner.group, inner.timeout_s, inner.check_finite) == (group, 9.0, True)
    assert (mh.group, mh.timeout_s) == (group, 9.0)
    assert inner.sparse_config == SparsePatternConfig(
        "local_window", local_window_size=8, block_size=4
    )
    default = DistributedBlockSparseMultiheadDilatedAttention(32, 4, [1], [16])
    assert (default.group, default.timeout_s, default.sparse_config) == (
        None, None, SparsePatternConfig(),
    )  # fmt: skip


def test_multihead_refuses_a_setting_its_attention_does_not_take() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) group; .*sparse_config"):
        BlockSparseRingMultiheadDilatedAttention(32, 4, [1], [16], group=None)
    with pytest.raises(ValueError, match="either sparse_config or its fields"):
        BlockSparseRingMultiheadDilatedAttention(32, 4, [1], [16], sparse_config=CFG, block_size=8)


def test_distributed_layer_hands_the_config_settings_to_its_attention() -> None:
    from dilated.core import DistributedConfig, RingAttentionConfig, RingDistributedConfig
    from dilated.ring.modules import DistributedLayer
    from dilated.sparse import BlockSparseRingDistributedDilatedAttention

    config = RingDistributedConfig(
        MultiheadConfig(embed_dim=32, num_heads=4),
        RingAttentionConfig([16, 32], [1, 2]),
        DistributedConfig(strategy="allgather", timeout_s=12.0),
    )
    layer = BlockSparseRingDistributedDilatedAttention(config, sparse_config=CFG, check_finite=True)
    assert isinstance(layer, DistributedLayer)
    inner = layer.layer.attention
    assert isinstance(inner, DistributedBlockSparseDilatedAttention)
    assert (inner.group, inner.timeout_s, inner.check_finite) == (None, 12.0, True)
    assert inner.sparse_config is CFG
    by_fields = BlockSparseRingDistributedDilatedAttention(
        config, pattern_type="dilated_sparse", block_size=8
    )
    assert by_fields.layer.sparse_config == SparsePatternConfig("dilated_sparse", block_size=8)
    with pytest.raises(ValueError, match="config must be a RingDistributedConfig"):
        BlockSparseRingDistributedDilatedAttention(config.ring_config)  # type: ignore[arg-type]
