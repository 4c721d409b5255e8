"""Code written for dilated-attention-pytorch runs here with only its imports changed.

The blocks below restate, verbatim except for their import lines, every example of the
refactoring summary the users of the original library follow (``seed-refactoring-summary.md``),
and the 0.2.0 call shapes that users meet; then each result is run on CPU at a small sequence
length (the sequence-parallel modules as a world of one) and checked where there is something to
check. The examples of ``docs/migration.md`` run in ``tests/test_docs.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dilated.core import (
    DistributedConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
    create_multihead_dilated_attention,
)
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention
from dilated.longnet import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
)
from dilated.ring import RingDistributedDilatedAttention


def _run(layer: nn.Module, seq: int = 256, embed_dim: int = 768) -> torch.Tensor:
    x = torch.randn(1, seq, embed_dim)
    with torch.no_grad():
        out = layer.eval()(x, x, x)
    assert isinstance(out, tuple) and out[1] is None
    assert out[0].shape == x.shape and torch.isfinite(out[0]).all()
    return out[0]


# --- seed-refactoring-summary.md, "Improved Developer Experience" -----------------------------


def test_seed_developer_experience_old_way() -> None:
    with pytest.warns(DeprecationWarning, match="RingDistributedDilatedAttention") as record:
        # Old way - complex initialization
        attention = RingDistributedDilatedAttention(
            embed_dim=768,
            num_heads=12,
            segment_lengths=[2048, 4096, 8192],
            dilation_rates=[1, 2, 4],
            dropout=0.1,
            block_size=1024,
            ring_size=4,
            enable_deepspeed=True,
            # ... many more parameters
        )
    said = " ".join(str(w.message) for w in record)
    assert "block_size" in said and "enable_deepspeed" in said and "world_size" in said
    assert attention.config.distributed_config.world_size == 4
    assert attention.config.ring_config.dropout == 0.1
    # ring_size=4 is a promise about the process group, kept at call time: a world of one fails.
    with pytest.raises(ValueError, match=r"world_size=4 but the process group has 1"):
        _run(attention)


def test_seed_developer_experience_new_way() -> None:
    # New way - clean factory pattern
    attention = create_multihead_dilated_attention(
        "ring",
        embed_dim=768,
        num_heads=12,
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
    )
    _run(attention)

    # Or with configs for full control
    config = RingDistributedConfig(
        multihead_config=MultiheadConfig(embed_dim=768, num_heads=12),
        ring_config=RingAttentionConfig(segment_lengths=[2048, 4096, 8192]),
        distributed_config=DistributedConfig(world_size=4),
    )
    attention = RingDistributedDilatedAttention(config)
    assert attention.config.ring_config.dilation_rates == (1, 1, 1)
    with pytest.raises(ValueError, match=r"world_size=4 but the process group has 1"):
        _run(attention)


# --- "Migration Examples: Transformer Layers" ---------------------------------------------------


def test_seed_transformer_layers() -> None:
    # Old way
    from dilated.longnet import DilatedTransformerEncoderLayer

    layer = DilatedTransformerEncoderLayer(
        d_model=512, nhead=8, segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.1
    )
    old = layer

    # New way - with factory
    from dilated.longnet import create_encoder_layer

    layer = create_encoder_layer(
        attention_type="ring",  # Choose implementation
        d_model=512,
        nhead=8,
        segment_lengths=[2048, 4096],
        dilation_rates=[1, 2],
    )
    # Both layers hold the same function: copy the weights and compare, on a sequence shorter than
    # a segment (the last segment may be short) and with the ring as a world of one.
    layer.load_state_dict(old.state_dict())
    x = torch.randn(2, 256, 512)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), old.eval()(x), rtol=1e-4, atol=1e-5)


# --- "Migration Examples: Distributed Attention" ------------------------------------------------


def test_seed_distributed_attention() -> None:
    # Old way - complex setup
    from dilated.ring import RingDistributedDilatedAttention

    attention = RingDistributedDilatedAttention(
        embed_dim=768,
        num_heads=12,
        # ... many parameters
    )
    old = attention
    assert old.config.ring_config.segment_lengths == (2048, 4096, 8192, 16384, 32768)

    # New way - cleaner
    from dilated.ring import create_ring_distributed_attention

    attention = create_ring_distributed_attention(
        embed_dim=768, num_heads=12, segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4]
    )
    _run(attention)
    _run(old)


# --- "Add More Factory Presets" -----------------------------------------------------------------


def test_seed_factory_presets() -> None:
    # Future enhancement examples
    attention = create_multihead_dilated_attention("gpt3_style")
    assert attention.embed_dim == 768
    attention = create_multihead_dilated_attention("longnet_1m")
    assert attention.embed_dim == 1024
    attention = create_multihead_dilated_attention("efficient_2b")
    _run(attention, seq=64, embed_dim=2048)


# --- dilated-attention-pytorch 0.2.0 call shapes -------------------------------------------------


def test_longnet_positional_arguments_of_0_2_0() -> None:
    model = LongNet(768, 12, 12, 12, 3072, [2048, 4096], [1, 2], device="meta")
    c = model.config
    assert (c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers) == (768, 12, 12, 12)
    assert (c.dim_feedforward, c.segment_lengths, c.dilation_rates) == (3072, (2048, 4096), (1, 2))
    assert len(model.encoder) == len(model.decoder) == 12
    small = LongNet(32, 4, 1, 1, 64, [8, 16], [1, 2], 0.0, "gelu", 1e-6)
    assert (small.config.activation, small.config.layer_norm_eps) == ("gelu", 1e-6)
    with pytest.raises(TypeError, match="both positionally and as a keyword"):
        LongNet(32, 4, d_model=32)


def test_longnet_lm_with_only_num_tokens_has_the_0_2_0_sizes() -> None:
    lm = LongNetLM(num_tokens=1000, device="meta")
    c = lm.config
    assert (c.num_tokens, c.d_model, c.nhead, c.num_decoder_layers) == (1000, 768, 12, 12)
    assert (c.num_encoder_layers, c.dim_feedforward, c.dropout) == (0, 3072, 0.0)
    assert c.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert LongNetLM(1000, 64, 4, 0, 2, 128, [8, 16], [1, 2]).config.d_model == 64


def test_longnet_lm_is_causal_argument_of_0_2_0() -> None:
    lm = LongNetLM(256, 32, 4, 0, 1, 64, [8, 16], [1, 2]).eval()
    ids = torch.randint(0, 256, (1, 24))
    with pytest.warns(DeprecationWarning, match="always causal"):
        torch.testing.assert_close(lm(ids, True), lm(ids))
    with pytest.raises(ValueError, match="always causal"):
        lm(ids, is_causal=False)


def _future_moves_past(fn: object, x: torch.Tensor, t: int) -> torch.Tensor:
    """How much the outputs before position ``t`` move when the input at ``t`` changes."""
    assert callable(fn)
    y = x.clone()
    y[:, t] += 3.0
    with torch.no_grad():
        return (fn(x)[:, :t] - fn(y)[:, :t]).abs().max()


def test_longnet_is_causal_true_is_causal_everywhere_as_in_0_2_0() -> None:
    torch.manual_seed(0)
    model = LongNet(32, 4, 2, 2, 64, [8, 16], [1, 2], 0.0, dtype=torch.float64).eval()
    x = torch.randn(1, 32, 32, dtype=torch.float64)
    assert _future_moves_past(lambda s: model(s, is_causal=True), x, 20) == 0
    assert _future_moves_past(model, x, 20) > 0  # default: bidirectional encoder
    with pytest.warns(DeprecationWarning, match="by keyword"):
        positional = model(x, True)
    with torch.no_grad():
        torch.testing.assert_close(positional, model(x, is_causal=True))


def test_decoder_memory_is_causal() -> None:
    torch.manual_seed(0)
    layer = DilatedTransformerDecoderLayer(32, 4, [8, 16], [1, 2], 64, 0.0).double().eval()
    tgt = torch.randn(2, 32, 32, dtype=torch.float64)
    memory = torch.randn(2, 32, 32, dtype=torch.float64)
    causal = lambda m: layer(tgt, m, tgt_is_causal=True, memory_is_causal=True)
    assert _future_moves_past(causal, memory, 12) == 0
    assert _future_moves_past(lambda m: layer(tgt, m), memory, 12) > 0
    with pytest.warns(DeprecationWarning, match="memory_is_causal= by keyword"):
        positional = layer(tgt, memory, True, True)
    with torch.no_grad():
        torch.testing.assert_close(positional, causal(memory))
    with pytest.raises(ValueError, match="as long as the target"):
        layer(tgt, memory[:, :16], memory_is_causal=True)


def _stack(layer: nn.Module, x: torch.Tensor, depth: int) -> torch.Tensor:
    for _ in range(depth):
        x = layer(x)
    return x


def test_encoder_layer_in_torch_transformer_encoder() -> None:
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(32, 4, [8, 16], [1, 2], 64, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "enable_nested_tensor is True, but"
        encoder = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 40, 32)
    blocks = list(encoder.layers)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), blocks[1](blocks[0](x)))
        # torch's convention, True = padding, is ours: the layers take the same bool mask
        # that nn.TransformerEncoder turns into the additive float form before calling them.
        padding = torch.zeros(2, 40, dtype=torch.bool)
        padding[1, 25:] = True
        got = encoder(x, src_key_padding_mask=padding)
        want = blocks[1](blocks[0](x, src_key_padding_mask=padding), src_key_padding_mask=padding)
        torch.testing.assert_close(got, want)
        causal = nn.Transformer.generate_square_subsequent_mask(40)
        torch.testing.assert_close(
            encoder(x, mask=causal, is_causal=True),
            blocks[1](blocks[0](x, is_causal=True), is_causal=True),
        )
    with pytest.raises(ValueError, match="src_mask is not supported"):
        encoder(x, mask=torch.zeros(40, 40))


def test_decoder_layer_in_torch_transformer_decoder() -> None:
    torch.manual_seed(0)
    layer = DilatedTransformerDecoderLayer(32, 4, [8, 16], [1, 2], 64, 0.0)
    decoder = nn.TransformerDecoder(layer, 2).eval()
    tgt, memory = torch.randn(2, 24, 32), torch.randn(2, 30, 32)
    blocks = list(decoder.layers)
    with torch.no_grad():
        # nn.TransformerDecoder passes tgt_is_causal=False when it is given no mask.
        want = blocks[1](blocks[0](tgt, memory, False), memory, False)
        torch.testing.assert_close(decoder(tgt, memory), want)
        padding = torch.zeros(2, 30, dtype=torch.bool)
        padding[0, 20:] = True
        additive = torch.zeros(2, 30).masked_fill(padding, float("-inf"))
        got = decoder(tgt, memory, memory_key_padding_mask=additive)
        want = blocks[1](
            blocks[0](tgt, memory, False, memory_key_padding_mask=padding),
            memory,
            False,
            memory_key_padding_mask=padding,
        )
        torch.testing.assert_close(got, want)
        # The bool mask of torch's convention is ours too: no longer refused as ambiguous.
        torch.testing.assert_close(decoder(tgt, memory, memory_key_padding_mask=padding), want)


def test_longnet_lm_default_sizes_run_a_short_sequence() -> None:
    lm = LongNetLM(num_tokens=1000, num_decoder_layers=1).eval()
    with torch.no_grad():
        logits = lm(torch.randint(0, 1000, (1, 16)))
    assert logits.shape == (1, 16, 1000)


def test_the_attention_is_the_reference() -> None:
    # What changed on purpose (docs/migration.md): one exact softmax over the branches' keys.
    mha = create_multihead_dilated_attention(
        "standard", embed_dim=32, num_heads=4, segment_lengths=[8, 16], dilation_rates=[1, 2]
    )
    q, k, v = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    ref, _ = dense_dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    got = mha.attention.double()(q, k, v, is_causal=True)
    assert_close_to_reference(got, ref, torch.float64)
