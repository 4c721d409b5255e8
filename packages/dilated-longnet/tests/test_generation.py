"""Incremental decoding with the KV cache equals full recomputation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.longnet import LayerKVCache, LongNetLM, cached_dilated_attention, generate
from dilated.longnet.kv_cache import decode_slots, decode_step, dilated_attention_at


def _lm(ws: tuple[int, ...], rs: tuple[int, ...], **kw: object) -> LongNetLM:
    torch.manual_seed(0)
    cfg = {
        "num_tokens": 40,
        "d_model": 32,
        "nhead": 4,
        "num_encoder_layers": 0,
        "num_decoder_layers": 2,
        "dim_feedforward": 64,
        "segment_lengths": ws,
        "dilation_rates": rs,
        "dropout": 0.0,
        **kw,
    }
    return LongNetLM(dtype=torch.float64, **cfg)  # type: ignore[arg-type]


CASES = [
    ((8,), (1,), {}),
    ((4, 8), (1, 2), {}),
    ((4, 8, 16), (1, 2, 4), {}),
    ((4, 8, 16), (1, 2, 4), {"num_kv_heads": 2}),
    ((6, 12), (2, 3), {"rotary": "xpos"}),
    ((4, 8), (1, 4), {"rotary": None}),
]


@pytest.mark.parametrize(("ws", "rs", "kw"), CASES)
@pytest.mark.parametrize("prompt", [3])
def test_greedy_tokens_with_and_without_cache(
    ws: tuple[int, ...], rs: tuple[int, ...], kw: dict[str, object], prompt: int
) -> None:
    model = _lm(ws, rs, **kw)
    ids = torch.randint(0, 40, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    n = 2 * max(ws) + 3 - prompt  # crosses several boundaries of every branch
    cached = generate(model, ids, n)
    full = generate(model, ids, n, use_cache=False)
    assert cached.shape == (2, prompt + n)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :prompt], ids)


@pytest.mark.parametrize(("ws", "rs", "kw"), CASES)
def test_cached_logits_equal_full_logits(
    ws: tuple[int, ...], rs: tuple[int, ...], kw: dict[str, object]
) -> None:
    # Stronger than tokens: every step's logits, teacher-forced over a random sequence.
    model = _lm(ws, rs, **kw).eval()
    ids = torch.randint(0, 40, (2, 2 * max(ws) + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, ids.shape[1])
        steps = [model(ids[:, :3], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(3, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


@given(
    seq=st.integers(1, 40),
    branches=st.sampled_from([((4,), (1,)), ((4, 8), (2, 4)), ((3, 9, 12), (1, 3, 4))]),
    kv=st.sampled_from([1, 2, 4]),
)
def test_one_token_attention_matches_dense_reference(
    seq: int, branches: tuple[tuple[int, ...], tuple[int, ...]], kv: int
) -> None:
    ws, rs = branches
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(1, seq, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, seq, kv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, seq, kv, 8, generator=g, dtype=torch.float64)
    ref, _ = dense_dilated_attention(q, k, v, ws, rs, is_causal=True)
    cache = LayerKVCache(1, seq, kv, 8, dtype=torch.float64, device="cpu")
    cache.write(0, k, v)
    t = seq - 1
    got = cached_dilated_attention(q[:, t : t + 1], cache, t, ws, rs)
    assert_close_to_reference(got.float(), ref[:, t : t + 1], torch.float32)


def test_sampling_and_errors() -> None:
    model = _lm((4, 8), (1, 2))
    ids = torch.zeros(1, 2, dtype=torch.long)
    a = generate(
        model, ids, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3)
    )
    b = generate(
        model, ids, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b) and a.shape == (1, 12)
    assert torch.equal(generate(model, ids, 0), ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -1)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ids, 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.zeros(2, dtype=torch.long), 2)
    cache = model.new_cache(1, 3)
    with pytest.raises(ValueError, match="capacity 3"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)


def test_new_token_reads_only_its_segment() -> None:
    # Entries outside the query's segment (and of the other phase) must not matter.
    ws, rs = (4, 8), (1, 2)
    q = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    cache = LayerKVCache(1, 24, 2, 8, dtype=torch.float64, device="cpu")
    cache.write(
        0,
        torch.randn(1, 24, 2, 8, dtype=torch.float64),
        torch.randn(1, 24, 2, 8, dtype=torch.float64),
    )
    before = cached_dilated_attention(q, cache, 21, ws, rs)
    cache.k[:, :16] = torch.nan  # positions of earlier segments of both branches
    cache.v[:, 22:] = torch.nan  # the future
    after = cached_dilated_attention(q, cache, 21, ws, rs)
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("kv", [4, 2])
def test_one_decode_step_with_padding_rates_above_heads_and_bf16(kv: int) -> None:
    # Rate 8 over 4 heads: some positions' phase has no head in a branch; key padding masks
    # slots of every branch; duplicates (a key in two branches) count twice, as in the merge.
    ws, rs, seq = (8, 16, 32), (1, 8, 4), 45
    x = make_inputs(2, seq, 4, 8, kv_heads=kv, padding=True, dtype=torch.float64, seed=kv)
    ref, _ = dense_dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=True, key_padding_mask=x.key_padding_mask
    )
    for t in (0, 7, 8, 21, 31, 44):
        got = dilated_attention_at(
            x.q[:, t : t + 1], x.k, x.v, t, ws, rs, key_padding_mask=x.key_padding_mask
        )
        assert_close_to_reference(got.float(), ref[:, t : t + 1], torch.float32)
    half = [t.to(torch.bfloat16) for t in (x.q, x.k, x.v)]
    got = dilated_attention_at(half[0][:, 30:31], half[1], half[2], 30, ws, rs)
    want, _ = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=True)
    assert got.dtype == torch.bfloat16
    assert_close_to_reference(got, want[:, 30:31], torch.bfloat16)


def test_decode_step_compiles_whole_with_a_device_position() -> None:
    """No host synchronisation and static shapes: one graph serves every position (the step a
    CUDA graph or ``torch.compile(mode="reduce-overhead")`` captures)."""
    ws, rs, seq = (4, 8), (1, 2), 20
    x = make_inputs(1, seq, 4, 8, kv_heads=2, seed=3)
    slots = decode_slots(ws, rs, 4, torch.device("cpu"))
    position = torch.tensor(0)
    step = torch.compile(
        lambda q, k, v, t: decode_step(q, k, v, t, slots, scale=0.3), fullgraph=True, dynamic=False
    )
    ref, _ = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=True, scale=0.3)
    for t in (5, 6, 17):
        position.fill_(t)
        got = step(x.q[:, t : t + 1], x.k, x.v, position)
        assert_close_to_reference(got, ref[:, t : t + 1], torch.float32)


def test_an_eager_step_indexes_its_slots_once_for_every_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every layer of an eager decoding step reads the same slots: computed once, on the first
    layer (each further layer would cost a copy to the device and about ten launches)."""
    from dilated.longnet.kv_cache import DecodeSlots

    model = _lm((4, 8, 16), (1, 2, 4), num_decoder_layers=3).eval()
    calls: list[int] = []
    real = DecodeSlots.index

    def spy(self: DecodeSlots, position: torch.Tensor, keys: int, dtype: torch.dtype) -> object:
        calls.append(int(position))
        return real(self, position, keys, dtype)

    monkeypatch.setattr(DecodeSlots, "index", spy)
    ids = torch.randint(0, 40, (2, 11))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(ids, cache=cache, check_ids=False)
        for t in range(11, 14):
            model(ids[:, :1], cache=cache, check_ids=False)
            assert calls[-1] == t and calls.count(t) == 1, calls


def test_an_eager_step_rotates_with_one_set_of_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """xPos: the first layer of a step computes the rotation's factors, the others reuse them;
    the cached logits still equal the full recomputation's (where each layer computes its
    own)."""
    from dilated.longnet.rotary import RotaryEmbedding

    model = _lm((4, 8), (1, 2), num_decoder_layers=3, rotary="xpos").eval()
    made: list[int] = []
    real = RotaryEmbedding._factors

    def spy(self: RotaryEmbedding, device: torch.device, n: int, offset: object) -> object:
        made.append(n)
        return real(self, device, n, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(RotaryEmbedding, "_factors", spy)
    ids = torch.randint(0, 40, (1, 12))
    cache = model.new_cache(1, 12)
    with torch.no_grad():
        model(ids[:, :9], cache=cache, check_ids=False)
        assert made == [9, 9, 9]
        steps = [model(ids[:, t : t + 1], cache=cache, check_ids=False) for t in range(9, 12)]
        assert made == [9, 9, 9, 1, 1, 1]
        full = model(ids, check_ids=False)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 9:], rtol=1e-10, atol=1e-10)


def test_a_step_after_inference_mode_still_trains() -> None:
    """The kept slot index and rotation factors of a step decoded under inference_mode are not
    reused by the same step with autograd on (inference tensors cannot be saved for backward)."""
    model = _lm((4, 8), (1, 2), rotary="xpos")
    ids = torch.randint(0, 40, (1, 6))
    for mode in (torch.inference_mode, torch.enable_grad):
        cache = model.new_cache(1, 8)
        with torch.no_grad():
            model(ids[:, :5], cache=cache, check_ids=False)
        with mode():
            logits = model(ids[:, 5:], cache=cache, check_ids=False)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
