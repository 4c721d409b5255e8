"""dilated-longnet layers with the block-sparse attention of dilated-sparse (the registry kind)."""

from __future__ import annotations

import pytest
import torch

from dilated.longnet import LayerKVCache, create_encoder_layer
from dilated.sparse import BlockSparseRingMultiheadDilatedAttention


def test_encoder_layer_with_block_sparse_attention() -> None:
    layer = create_encoder_layer(
        attention_type="block_sparse", d_model=32, nhead=4, segment_lengths=[16, 32],
        dilation_rates=[1, 2], dim_feedforward=64, dropout=0.0,
    )  # fmt: skip
    assert isinstance(layer.self_attn, BlockSparseRingMultiheadDilatedAttention)
    x = torch.randn(2, 40, 32, requires_grad=True)
    y = layer(x, is_causal=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    cache = LayerKVCache(2, 64, 4, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="KV cache reproduces plain dilated attention"):
        layer(x.detach(), is_causal=True, cache=cache)
