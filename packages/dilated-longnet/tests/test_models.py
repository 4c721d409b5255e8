"""Models: shapes, tied head, gradient checkpointing, presets, and that training lowers the loss."""

from __future__ import annotations

import torch

from dilated.longnet import LongNet, LongNetConfig, LongNetLM

TEXT = (
    b"It was the best of times, it was the worst of times, it was the age of wisdom, "
    b"it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    b"incredulity, it was the season of Light, it was the season of Darkness. "
) * 4


def _cfg(**kw: object) -> LongNetConfig:
    base = {
        "num_tokens": 256,
        "d_model": 32,
        "nhead": 4,
        "num_encoder_layers": 0,
        "num_decoder_layers": 2,
        "dim_feedforward": 64,
        "segment_lengths": (8, 16, 32),
        "dilation_rates": (1, 2, 4),
        "dropout": 0.0,
    }
    return LongNetConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_lm_shapes_and_tied_head() -> None:
    model = LongNetLM(_cfg())
    ids = torch.randint(0, 256, (3, 21))
    assert model(ids).shape == (3, 21, 256)
    assert model.head.weight is model.embedding.weight
    untied = LongNetLM(_cfg(tie_weights=False))
    assert untied.head.weight is not untied.embedding.weight
    assert LongNetLM.from_preset("longnet_tiny").config.d_model == 128


def test_encoder_decoder_shapes() -> None:
    net = LongNet(_cfg(num_tokens=0, num_encoder_layers=1, num_decoder_layers=1))
    src, tgt = torch.randn(2, 32, 32), torch.randn(2, 12, 32)
    assert net(src).shape == (2, 32, 32)
    assert net(src, tgt).shape == (2, 12, 32)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    a = LongNetLM(_cfg())
    b = LongNetLM(_cfg(gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 256, (2, 24))
    a.loss(ids).backward()
    b.loss(ids).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = LongNetLM(_cfg())
    data = torch.tensor(list(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, data.numel() - 33, (8,), generator=gen).tolist()
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert start > 5.0  # ~ln(256) for an untrained byte model
    assert end < 0.5 * start, (start, end)


def test_models_compile_with_fullgraph() -> None:
    """No graph break anywhere in LongNetLM or LongNet (embedding, rotary, layers, the
    attention's dispatch): compiled equals eager, forward and backward."""
    torch.manual_seed(0)
    lm = LongNetLM(num_tokens=50, d_model=32, nhead=4, num_kv_heads=2, num_decoder_layers=2,
                   segment_lengths=[8, 16], dilation_rates=[1, 2], dropout=0.0)  # fmt: skip
    tokens = torch.randint(0, 50, (2, 24))
    eager = lm(tokens)
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")(tokens)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager.square().mean(), lm.embedding.weight)
    (g_compiled,) = torch.autograd.grad(compiled.square().mean(), lm.embedding.weight)
    torch.testing.assert_close(g_compiled, g_eager)
    net = LongNet(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                  segment_lengths=[8, 16], dilation_rates=[1, 2], dropout=0.0)  # fmt: skip
    x = torch.randn(1, 16, 32)
    torch.testing.assert_close(
        torch.compile(net, fullgraph=True, backend="aot_eager")(x, x), net(x, x)
    )
