"""The fast decoding mode (StaticDecoder, generate(fast=True)) on CPU, where the static step runs
eagerly: the same tokens as recomputing everything, the same logits as the cached step, one
graph for every position, and its argument errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dilated.longnet import LongNetConfig, LongNetLM, StaticDecoder, generate

VOCAB = 48


def _lm(dtype: torch.dtype, preset: str | None = None, **kw: Any) -> LongNetLM:
    torch.manual_seed(0)
    sizes: dict[str, Any] = {
        "num_tokens": VOCAB,
        "d_model": 32,
        "nhead": 4,
        "num_decoder_layers": 2,
        "dim_feedforward": 64,
        "dropout": 0.0,
    }
    if preset is not None:
        config = LongNetConfig.from_preset(preset, **{**sizes, **kw})
    else:
        config = LongNetConfig(num_encoder_layers=0, **{**sizes, **kw})
    return LongNetLM(config, dtype=dtype).eval()


# Causal models with several branches: the longnet_tiny preset's (32, 64, 128) / (1, 2, 4),
# rates above 1 that do not divide one another, grouped-query attention, xPos, no rotary.
MODELS: list[tuple[str | None, dict[str, Any]]] = [
    ("longnet_tiny", {}),
    ("longnet_tiny", {"num_kv_heads": 2}),
    (None, {"segment_lengths": (6, 12), "dilation_rates": (2, 3), "rotary": "xpos"}),
    (None, {"segment_lengths": (4, 8, 16), "dilation_rates": (1, 4, 8), "rotary": None}),
]
# Odd prompt lengths; the new tokens cross segment boundaries of every branch: 29 + 40 crosses
# 32 and 64, 61 + 9 crosses 64; with the short segments 1 + 20 crosses 6, 8, 12 and 16, and
# 13 + 12 crosses 16 and 24.
LENGTHS = {"longnet_tiny": [(29, 40), (61, 9)], None: [(1, 20), (13, 12)]}
GREEDY = [(p, kw, n, new) for p, kw in MODELS for n, new in LENGTHS[p]]


def _prompt(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("preset", "kw", "prompt", "new"), GREEDY)
def test_fast_greedy_equals_uncached(
    dtype: torch.dtype, preset: str | None, kw: dict[str, Any], prompt: int, new: int
) -> None:
    model = _lm(dtype, preset, **kw)
    ids = _prompt(2, prompt, seed=prompt)
    fast = generate(model, ids, new, fast=True)
    assert fast.shape == (2, prompt + new)
    assert torch.equal(fast[:, :prompt], ids)
    assert torch.equal(fast, generate(model, ids, new, use_cache=False))


@pytest.mark.parametrize(("preset", "kw"), MODELS)
def test_static_step_gives_the_logits_of_the_cached_step(
    preset: str | None, kw: dict[str, Any]
) -> None:
    # The static step runs the same operations as the cached forward at an int position: a
    # device-side position changes where the numbers come from, not the numbers.
    model = _lm(torch.float32, preset, **kw)
    n = 70 if preset else 30  # past the longest segment
    ids = _prompt(3, n, seed=1)
    decoder = StaticDecoder(model, 3, n)
    cache = model.new_cache(3, n)
    with torch.no_grad():
        assert torch.equal(decoder.prefill(ids[:, :7]), model(ids[:, :7], cache=cache)[:, -1])
        for t in range(7, n):
            want = model(ids[:, t : t + 1], cache=cache)[:, -1]
            assert torch.equal(decoder.step(ids[:, t]), want), t
    assert decoder.length == n == cache.length


def test_teacher_forced_logits_equal_full_forward() -> None:
    model = _lm(torch.float64, "longnet_tiny")
    ids = _prompt(2, 70, seed=2)
    with torch.no_grad():
        full = model(ids)
    decoder = StaticDecoder(model, 2, 70)
    steps = [decoder.prefill(ids[:, :3])]
    steps += [decoder.step(ids[:, t : t + 1]).clone() for t in range(3, 70)]
    torch.testing.assert_close(torch.stack(steps[1:], dim=1), full[:, 3:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(steps[0], full[:, 2], rtol=1e-9, atol=1e-9)


def test_a_decoder_is_reused_across_prompts() -> None:
    model = _lm(torch.float64, "longnet_tiny")
    decoder = StaticDecoder(model, 1, 40)

    def greedy(prompt: torch.Tensor) -> list[int]:
        logits, out = decoder.prefill(prompt), []
        for _ in range(40 - prompt.shape[1]):
            out.append(int(logits.argmax(-1)))
            if decoder.length < decoder.max_length:
                logits = decoder.step(logits.argmax(-1))
        return out

    a, b = _prompt(1, 9, seed=3), _prompt(1, 17, seed=4)
    first_a, first_b, again_a = greedy(a), greedy(b), greedy(a)
    assert first_a == again_a
    assert first_b == generate(model, b, 23, use_cache=False)[0, 17:].tolist()


def test_decode_at_compiles_whole_for_every_position() -> None:
    """No host synchronisation and nothing that depends on the position on the host: one graph
    (no graph break, no recompilation) serves every position."""
    model = _lm(torch.float32, "longnet_tiny", num_kv_heads=2)
    ids = _prompt(2, 40, seed=5)
    eager, compiled_cache = model.new_cache(2, 40), model.new_cache(2, 40)
    position = torch.tensor(0)
    torch._dynamo.reset()
    step = torch.compile(model.decode_at, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(ids[:, :5], cache=eager)
        model(ids[:, :5], cache=compiled_cache)
        for t in range(5, 40):
            position.fill_(t)
            got = step(ids[:, t : t + 1], compiled_cache, position)
            want = model(ids[:, t : t + 1], cache=eager)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_argument_errors_name_the_argument() -> None:
    model = _lm(torch.float32, "longnet_tiny")
    ids = _prompt(2, 5, seed=6)
    with pytest.raises(TypeError, match="model must be a LongNetLM"):
        StaticDecoder(torch.nn.Linear(2, 2), 1, 8)  # type: ignore[arg-type]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch"):
            StaticDecoder(model, bad, 8)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_length"):
            StaticDecoder(model, 1, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on CUDA"):
        StaticDecoder(model, 2, 8, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph"):
        StaticDecoder(model, 2, 8, cuda_graph="yes")  # type: ignore[arg-type]
    decoder = StaticDecoder(model, 2, 7)
    with pytest.raises(ValueError, match="prefill"):
        decoder.step(ids[:, 0])
    with pytest.raises(ValueError, match=r"batch 3 but the decoder was made for batch 2"):
        decoder.prefill(_prompt(3, 5, seed=7))
    with pytest.raises(ValueError, match="max_length is 7"):
        decoder.prefill(_prompt(2, 8, seed=7))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        decoder.prefill(ids + VOCAB)
    decoder.prefill(ids)
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        decoder.step(ids[:, :2])  # (batch, 2)
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        decoder.step(ids[:1, 0])  # another batch
    with pytest.raises(ValueError, match="tokens must be integer ids of shape"):
        decoder.step(ids[:, 0].float())
    decoder.step(ids[:, 0])
    decoder.step(ids[:, :1])
    with pytest.raises(ValueError, match="cache is full: max_length=7"):
        decoder.step(ids[:, 0])
    model.train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        StaticDecoder(model, 2, 8).prefill(ids)
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, ids, 3, fast=True, use_cache=False)
    with pytest.raises(TypeError, match="fast"):
        generate(model, ids, 3, fast=1)  # type: ignore[arg-type]


def test_default_decodes_fast_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fast=None`` (the default) takes the StaticDecoder for a model on CUDA and the eager
    cache elsewhere; without the cache it never does."""
    import dilated.longnet.generation as generation

    model = _lm(torch.float64, "longnet_tiny")
    ids = _prompt(1, 29, seed=3)
    made: list[int] = []

    class Recording(StaticDecoder):
        def __init__(self, *args: Any, **kw: Any) -> None:
            made.append(1)
            super().__init__(*args, **kw)

    monkeypatch.setattr(generation, "StaticDecoder", Recording)
    eager = generate(model, ids, 40)
    assert made == []
    # What the default does for a model on CUDA, run on this CPU: the same tokens.
    monkeypatch.setattr(generation, "_on_cuda", lambda model: True)
    static = generate(model, ids, 40)
    assert made == [1]
    generate(model, ids, 40, use_cache=False)
    assert made == [1]
    assert torch.equal(static, eager)


def test_generate_records_no_autograd_graph() -> None:
    """Every mode decodes under ``torch.no_grad``: no step keeps activations for a backward."""
    model = _lm(torch.float64, "longnet_tiny")
    ids = _prompt(1, 9, seed=5)
    grad_modes: list[bool] = []
    model.embedding.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    for fast in (None, True, False):
        generate(model, ids, 3, fast=fast)
    generate(model, ids, 3, use_cache=False)
    assert grad_modes and not any(grad_modes)


def test_fast_sampling_matches_cached_sampling() -> None:
    model = _lm(torch.float64, "longnet_tiny")
    ids = _prompt(2, 11, seed=8)

    def sample(fast: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(9)
        return generate(model, ids, 30, temperature=0.9, top_k=10, generator=g, fast=fast)

    assert torch.equal(sample(True), sample(False))
