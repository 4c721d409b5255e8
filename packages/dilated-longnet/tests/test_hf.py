"""Hugging Face models with attn_implementation="dilated": tiny random configs on CPU, nothing downloaded."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import dilated.longnet.hf as dhf  # noqa: E402
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention  # noqa: E402

VOCAB = 128
# Families whose attention layers go through AttentionInterface, with what they need here.
CONFIGS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
}
# transformers 5 renamed the cache argument of forward.
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def _config(family: str = "llama", **kw: Any) -> Any:
    sizes = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    }
    cls, extra = CONFIGS[family]
    return cls(**{**sizes, **extra, **kw})


def _model(config: Any, attn: str = "dilated", dtype: torch.dtype = torch.float64) -> Any:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@given(
    branches=st.sampled_from([((4,), (1,)), ((4, 8), (1, 2)), ((6, 12), (2, 3)), ((2, 8), (2, 4))]),
    seq=st.integers(1, 19),
    new=st.integers(1, 19),
    kv_heads=st.sampled_from([1, 2, 4]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_calls_equal_dense_judge(
    branches: tuple[tuple[int, ...], tuple[int, ...]],
    seq: int,
    new: int,
    kv_heads: int,
    causal: bool,
    padded: bool,
    seed: int,
) -> None:
    # A stand-in for the calling layer: the function reads only .config and .is_causal.
    ws, rs = branches
    config = SimpleNamespace(dilated_segment_lengths=list(ws), dilated_dilation_rates=list(rs))
    layer = SimpleNamespace(config=config, is_causal=causal)
    n_q = min(new, seq) if causal else seq  # fewer queries than keys only with a cache
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, seq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, seq, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, kv_heads, seq, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, seq, generator=g) > 0.3 if padded else None
    out, _ = dhf.dilated_attention_forward(layer, q[:, :, seq - n_q :], k, v, mask)
    want, _ = dense_dilated_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        ws,
        rs,
        is_causal=causal,
        key_padding_mask=mask,
    )
    assert_close_to_reference(out, want[:, seq - n_q :], torch.float64)


def _train(model: Any, ids: torch.Tensor, steps: int = 8) -> list[float]:
    """Losses of ``steps`` AdamW steps on one batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _cached_logits(model: Any, ids: torch.Tensor, prefill: int, stepwise: int) -> torch.Tensor:
    """Teacher-forced logits through a cache: a prefill, one token at a time up to ``stepwise``,
    then the rest as one chunk."""
    out = model(ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(prefill, stepwise):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache})
        logits.append(out.logits)
        cache = out.past_key_values
    logits.append(model(ids[:, stepwise:], use_cache=True, **{CACHE_KW: cache}).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_full_branch_equals_sdpa(family: str, dtype: torch.dtype) -> None:
    # One segment covering the sequence at rate 1 is dense causal attention.
    seq = 24
    dilated = _model(dhf.configure(_config(family), [seq], [1]), dtype=dtype)
    sdpa = _model(_config(family), "sdpa", dtype=dtype)
    assert dilated.config._attn_implementation == "dilated"
    ids = _ids(2, seq)
    with torch.no_grad():
        got, want = dilated(ids).logits, sdpa(ids).logits
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("n_q", [20, 5, 1])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_function_equals_dense_judge(n_q: int, padded: bool, dtype: torch.dtype) -> None:
    # The registered function against the float64 judge: GQA, real branches, a seq that is not a
    # multiple of the segments, and the last n_q queries over all keys as with a cache.
    config = dhf.configure(_config(), [8, 16], [1, 2])
    layer = _model(config).model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 20, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 20, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 20, 16, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.zeros(2, 20, dtype=torch.bool)
        mask[1, :5] = True  # key_padding_mask's convention: True = padding
    out, weights = dhf.dilated_attention_forward(
        layer, q[:, :, -n_q:].to(dtype), k.to(dtype), v.to(dtype), mask, scaling=0.3
    )
    assert weights is None
    assert out.dtype == dtype
    want, _ = dense_dilated_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        (8, 16),
        (1, 2),
        scale=0.3,
        is_causal=True,
        key_padding_mask=mask,
    )
    assert_close_to_reference(out, want[:, -n_q:], dtype)


def test_training_lowers_the_loss() -> None:
    config = dhf.configure(_config("qwen2"), [8, 16], [1, 2])
    model = _model(config, dtype=torch.float32).train()
    ids = _ids(4, 32, seed=3)
    losses = _train(model, ids)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize(("family", "prompt"), [("llama", 3), ("qwen2", 11)])
def test_cached_greedy_generation_equals_full_recompute(family: str, prompt: int) -> None:
    # 3 + 20 and 11 + 20 tokens cross the boundaries of both branches (8 and 16).
    model = _model(dhf.configure(_config(family), [8, 16], [1, 2]))
    ids = _ids(2, prompt, seed=prompt)
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(ids, use_cache=True, **kw)
    full = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, prompt + 20)
    assert torch.equal(cached, full)


def test_cached_logits_equal_full_logits() -> None:
    # Teacher-forced: prefill 10, then one token at a time and a chunk of 7 at once.
    model = _model(dhf.configure(_config(), [4, 8, 16], [1, 2, 4]))
    ids = _ids(2, 27, seed=5)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(_cached_logits(model, ids, 10, 20), full, atol=1e-10, rtol=1e-10)


def test_padding_mask_hides_the_padded_tokens() -> None:
    model = _model(dhf.configure(_config(), [8, 16], [1, 2]))
    ids = _ids(2, 20, seed=7)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding of the second row
    other = ids.clone()
    other[1, :6] = (ids[1, :6] + 1) % VOCAB  # different tokens under the padding
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
        unmasked = model(other).logits
    torch.testing.assert_close(a[:, 6:], b[:, 6:], atol=1e-12, rtol=0)
    assert not torch.allclose(a[1, 6:], unmasked[1, 6:])  # the mask did something
    # Cached generation of the padded batch equals its full recomputation.
    kw = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_dropout_is_applied_in_training_only() -> None:
    model = _model(dhf.configure(_config(attention_dropout=0.5), [8, 16], [1, 2]))
    ids = _ids(1, 16)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_configure_stores_json_friendly_branches() -> None:
    config = dhf.configure(_config(), (8, 16), (1, 2))
    assert config.dilated_segment_lengths == [8, 16]
    assert config.dilated_dilation_rates == [1, 2]
    assert config.dilated_backend == "auto"
    again = type(config).from_dict(config.to_dict())
    assert again.dilated_segment_lengths == [8, 16]


@pytest.mark.parametrize(
    ("ws", "rs", "message"),
    [
        ([8, 16], [1], "same length"),
        ([8, 15], [1, 2], "multiple of dilation_rates"),
        ([], [], "must not be empty"),
        ([8, 0], [1, 1], "positive integer"),
    ],
)
def test_configure_rejects_bad_branches(ws: list[int], rs: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dhf.configure(_config(), ws, rs)


def test_configure_rejects_unknown_backend() -> None:
    config = _config()
    with pytest.raises(ValueError, match="dilated backend must be one of"):
        dhf.configure(config, [8], [1], backend="nope")
    assert not hasattr(config, "dilated_segment_lengths")  # nothing half-set


def test_missing_branches_name_the_attributes_and_the_helper() -> None:
    model = _model(_config())
    with pytest.raises(
        ValueError, match=r"dilated_segment_lengths or dilated_dilation_rates.*configure"
    ):
        model(_ids(1, 8))


def test_branches_set_by_hand_are_validated() -> None:
    config = _config()
    config.dilated_segment_lengths, config.dilated_dilation_rates = [8, 16], [3, 2]
    with pytest.raises(ValueError, match=r"config.dilated_segment_lengths.*multiple"):
        _model(config)(_ids(1, 8))


def test_4d_mask_is_rejected() -> None:
    model = _model(dhf.configure(_config(), [8], [1]))
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="supports only a key padding mask"):
        model(_ids(1, 8), attention_mask=mask)


def _greedy_by_full_forward(model: Any, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The reference: every token from a forward pass over the whole sequence, no cache."""
    with torch.no_grad():
        for _ in range(new):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("family", "prompt"), [("llama", 3), ("llama", 13), ("qwen2", 7)])
def test_static_cache_greedy_equals_dynamic_and_full_forward(
    dtype: torch.dtype, family: str, prompt: int
) -> None:
    # Odd prompts; 3 + 22, 13 + 22 and 7 + 22 tokens cross boundaries of every branch.
    model = _model(dhf.configure(_config(family), [4, 8, 16], [1, 2, 4]), dtype=dtype)
    ids = _ids(2, prompt, seed=prompt)
    kw = {"max_new_tokens": 22, "do_sample": False, "pad_token_id": 0}
    static = model.generate(ids, cache_implementation="static", **kw)
    dynamic = model.generate(ids, use_cache=True, **kw)
    assert static.shape == (2, prompt + 22)
    assert torch.equal(static, dynamic)
    assert torch.equal(static, _greedy_by_full_forward(model, ids, 22))


def test_static_cache_with_padding_equals_dynamic() -> None:
    model = _model(dhf.configure(_config(), [4, 8], [1, 2]))
    ids = _ids(2, 9, seed=8)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding of the second row
    kw = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(ids, **kw))
    assert torch.equal(static, model.generate(ids, use_cache=False, **kw))


def test_static_cache_logits_equal_full_logits() -> None:
    # Teacher-forced through a StaticCache longer than the text: a prompt of 10, one token at a
    # time up to 20, then a chunk of 7 over the written prefix.
    model = _model(dhf.configure(_config(), [4, 8, 16], [1, 2, 4]))
    ids = _ids(2, 27, seed=5)
    cache = transformers.StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        full = model(ids).logits
        logits = [model(ids[:, :10], use_cache=True, **{CACHE_KW: cache}).logits]
        for t in range(10, 20):
            logits.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_KW: cache}).logits)
        logits.append(model(ids[:, 20:], use_cache=True, **{CACHE_KW: cache}).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-10, rtol=1e-10)


def _static_call(
    n_q: int, end: int, padded: bool, dtype: torch.dtype = torch.float64
) -> tuple[Any, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor | None]:
    """The attention function's inputs with a static cache of 30 slots, ``end`` written (NaN
    in the others: never read), and the float64 inputs of the judge."""
    g = torch.Generator().manual_seed(n_q + end)
    q = torch.randn(2, 4, end, 16, generator=g, dtype=torch.float64)
    k = torch.full((2, 2, 30, 16), float("nan"), dtype=torch.float64)
    v = torch.full((2, 2, 30, 16), float("nan"), dtype=torch.float64)
    k[:, :, :end] = torch.randn(2, 2, end, 16, generator=g, dtype=torch.float64)
    v[:, :, :end] = torch.randn(2, 2, end, 16, generator=g, dtype=torch.float64)
    real = torch.ones(2, end, dtype=torch.long)
    if padded:
        real[1, :5] = 0  # transformers' convention: 0 = padding
    slot_map = dhf.dilated_attention_mask(
        2, 30, attention_mask=real, q_offset=torch.tensor(end - n_q), q_length=n_q
    )
    assert slot_map is not None and slot_map.shape == (2, 1, 1, 30)
    args = (q[:, :, -n_q:].contiguous().to(dtype), k.to(dtype), v.to(dtype), slot_map)
    return q, args, k, (real == 0) if padded else None


@pytest.mark.parametrize("n_q", [1, 4, 21])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_static_cache_attention_equals_dense_judge(
    n_q: int, padded: bool, dtype: torch.dtype
) -> None:
    # One query (the decoding step, its position read on the device), a chunk, and a prompt,
    # over the written prefix of the slots (21 of 30), against the float64 judge.
    layer = _model(dhf.configure(_config(), [8, 16], [1, 2])).model.layers[0].self_attn
    q, args, k, padding = _static_call(n_q, 21, padded, dtype)
    out, weights = dhf.dilated_attention_forward(layer, *args, scaling=0.3)
    assert weights is None and out.dtype == dtype and out.shape == (2, n_q, 4, 16)
    want, _ = dense_dilated_attention(
        q.transpose(1, 2),
        k[:, :, :21].transpose(1, 2),
        args[2][:, :, :21].transpose(1, 2).double(),
        (8, 16),
        (1, 2),
        scale=0.3,
        is_causal=True,
        key_padding_mask=padding,
    )
    assert_close_to_reference(out, want[:, -n_q:], dtype)


def test_static_decoding_step_compiles_whole_for_every_position() -> None:
    """A static cache's decoding step: static shapes, no host synchronisation, one graph (no
    graph break, no recompilation) for every position, as generate's compiled decoding needs."""
    layer = _model(dhf.configure(_config(), [4, 8], [1, 2])).model.layers[0].self_attn
    torch._dynamo.reset()
    step = torch.compile(dhf.dilated_attention_forward, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for end in (3, 9, 17, 21):
            args = _static_call(1, end, padded=True)[1]
            got, _ = step(layer, *args)
            want, _ = dhf.dilated_attention_forward(layer, *args)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_sliding_window_cache_is_rejected() -> None:
    # A cache whose keys start after position 0 (a sliding-window cache) cannot hold segments.
    with pytest.raises(ValueError, match="sliding-window caches are not supported"):
        dhf.dilated_attention_mask(1, 8, kv_offset=4, q_offset=11, q_length=1)


def test_sliding_window_is_rejected() -> None:
    config = _config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    model = _model(dhf.configure(config, [8], [1]))
    with pytest.raises(ValueError, match=r"sliding_window = 4;.*set config\.sliding_window = None"):
        model(_ids(1, 8))
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="sliding-window attention"):
        dhf.dilated_attention_forward(layer, q, q[:, :2], q[:, :2], None, sliding_window=4)


def test_mistral_default_sliding_window_names_the_fix() -> None:
    # MistralConfig's default sliding_window is 4096: the error must say what to change.
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB}  # fmt: skip
    config = transformers.MistralConfig(**sizes)
    assert config.sliding_window == 4096
    model = _model(dhf.configure(config, [8], [1]))
    with pytest.raises(
        ValueError, match=r"sliding_window = 4096.*set config\.sliding_window = None"
    ):
        model(_ids(1, 8))
    config.sliding_window = None
    assert model(_ids(1, 8)).logits.shape == (1, 8, VOCAB)


def test_attention_mask_becomes_a_torch_style_key_padding_mask() -> None:
    # transformers: 1 = real token; key_padding_mask: True = padding (converted here, once).
    real = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    got = dhf.dilated_attention_mask(2, 4, attention_mask=real, q_offset=0, q_length=4)
    assert got is not None and torch.equal(got, real == 0)
    unpadded = torch.ones(2, 4, dtype=torch.long)
    assert dhf.dilated_attention_mask(2, 4, attention_mask=unpadded, q_offset=0, q_length=4) is None


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return done.stdout.strip()


def test_import_dilated_longnet_registers_when_transformers_is_imported() -> None:
    # Forgetting `import dilated.longnet.hf` must not give transformers' generic error when
    # transformers was imported first; without it, dilated.longnet never imports transformers.
    registered = _run(
        "import transformers, dilated.longnet\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "print('dilated' in AttentionInterface._global_mapping,"
        " 'dilated' in AttentionMaskInterface._global_mapping)"
    )
    assert registered == "True True"
    assert _run("import sys, dilated.longnet; print('transformers' in sys.modules)") == "False"


def test_cross_length_non_causal_call_is_rejected() -> None:
    layer = _model(dhf.configure(_config(), [8], [1])).model.layers[0].self_attn
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="as many queries as keys"):
        dhf.dilated_attention_forward(layer, q, k, k, None, is_causal=False)


# The same models on CUDA, where backend "auto" runs dilated.kernels (cuDNN / Triton).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_model(dtype: torch.dtype, kv_heads: int = 2) -> Any:
    pytest.importorskip("dilated.kernels")
    # head_dim 64: inside every kernel's supported range. Without GQA, mask or dropout, "auto"
    # takes cuDNN; otherwise Triton.
    config = _config(hidden_size=256, intermediate_size=512, num_key_value_heads=kv_heads)
    dhf.configure(config, [16, 32], [1, 2])
    return _model(config, dtype=torch.float32).to("cuda", dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_gpu_kernels_equal_the_reference_backend(
    dtype: torch.dtype, padded: bool, kv_heads: int
) -> None:
    model = _gpu_model(dtype, kv_heads)
    ids = _ids(2, 80, seed=11).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits.float()
        model.config.dilated_backend = "reference"
        want = model(ids, attention_mask=mask).logits.float()
    # Two layers of 16-bit rounding between two exact computations of the same attention.
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_q", [96, 7, 1])
@pytest.mark.parametrize(("kv_heads", "padded"), [(4, False), (2, False), (4, True)])
def test_gpu_attention_function_equals_dense_judge(
    dtype: torch.dtype, n_q: int, kv_heads: int, padded: bool
) -> None:
    pytest.importorskip("dilated.kernels")
    config = SimpleNamespace(dilated_segment_lengths=[16, 32], dilated_dilation_rates=[1, 2])
    layer = SimpleNamespace(config=config, is_causal=True)
    g = torch.Generator(device="cuda").manual_seed(n_q)
    q = torch.randn(2, 4, 96, 64, generator=g, device="cuda").to(dtype)
    k = torch.randn(2, kv_heads, 96, 64, generator=g, device="cuda").to(dtype)
    v = torch.randn(2, kv_heads, 96, 64, generator=g, device="cuda").to(dtype)
    mask = None
    if padded:
        mask = torch.zeros(2, 96, dtype=torch.bool, device="cuda")
        mask[1, :13] = True
    out, _ = dhf.dilated_attention_forward(layer, q[:, :, 96 - n_q :], k, v, mask)
    want, _ = dense_dilated_attention(
        q.transpose(1, 2).double(),
        k.transpose(1, 2).double(),
        v.transpose(1, 2).double(),
        (16, 32),
        (1, 2),
        is_causal=True,
        key_padding_mask=mask,
    )
    assert_close_to_reference(out, want[:, 96 - n_q :], dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_cached_logits_equal_full_logits(dtype: torch.dtype) -> None:
    model = _gpu_model(dtype)
    ids = _ids(2, 70, seed=12).cuda()
    with torch.no_grad():
        full = model(ids).logits.float()
    cached = _cached_logits(model, ids, 33, 60).float()
    torch.testing.assert_close(cached, full, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_static_cache_generation_equals_dynamic(compiled: bool) -> None:
    # On CUDA generate compiles the decoding step of a static cache (torch.compile,
    # "reduce-overhead": the slot map's position is read on the device); disable_compile=True
    # runs the same step eagerly. float32, so that greedy ties are out of reach.
    model = _gpu_model(torch.float32)
    ids = _ids(2, 21, seed=13).cuda()
    kw = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    dynamic = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", disable_compile=not compiled, **kw)
    assert torch.equal(static, dynamic)


@pytest.mark.gpu
@needs_cuda
def test_gpu_training_lowers_the_loss() -> None:
    model = _gpu_model(torch.bfloat16).train()
    ids = _ids(4, 96, seed=13).cuda()
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.5, losses


HAS_KERNELS = importlib.util.find_spec("dilated.kernels") is not None


@pytest.mark.skipif(not HAS_KERNELS, reason="pins a backend of dilated-kernels")
@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_pinned_backend_equals_auto(backend: str) -> None:
    # On CPU "auto" is the reference; "triton" runs under the interpreter (TRITON_INTERPRET=1).
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    model = _model(dhf.configure(_config(), [8, 16], [1, 2]), dtype=torch.float32)
    ids = _ids(1, 24, seed=9)
    with torch.no_grad():
        want = model(ids).logits
        dhf.configure(model.config, [8, 16], [1, 2], backend=backend)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(HAS_KERNELS, reason="checks the error without dilated-kernels")
def test_kernel_backend_without_kernels_says_what_to_install() -> None:
    with pytest.raises(ValueError, match="install dilated-kernels"):
        dhf.configure(_config(), [8], [1], backend="sdpa")


def test_packed_batch_equals_each_sequence_alone() -> None:
    # Padding-free training: sequences packed along seq with restarting positions and the
    # cu_seq_lens_* keywords transformers passes to flash-attn; segments count from each start.
    config = dhf.configure(_config(), [4, 8], [1, 2])
    model = _model(config)
    a, b = _ids(1, 11, seed=1), _ids(1, 6, seed=2)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(6)])[None]
    cu = torch.tensor([0, 11, 17], dtype=torch.int32)
    with torch.no_grad():
        got = model(
            packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
            max_length_q=11, max_length_k=11,
        ).logits  # fmt: skip
        want = torch.cat([model(a).logits, model(b).logits], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k"):
        dhf.dilated_attention_forward(
            SimpleNamespace(config=config, is_causal=True),
            *(torch.randn(1, 4, 17, 16, dtype=torch.float64) for _ in range(3)),
            None, cu_seq_lens_q=cu,
        )  # fmt: skip
