"""LongNetLM on CUDA with its defaults (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dilated.core.testing import assert_close_to_reference
from dilated.longnet import LongNetLM, StaticDecoder, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_lm_compiles_with_fullgraph_on_gpu() -> None:
    """The default attention ("auto": the cuDNN custom op) keeps the whole model one graph."""
    torch.manual_seed(0)
    lm = LongNetLM(num_tokens=1000, d_model=256, nhead=4, num_kv_heads=2, num_decoder_layers=2,
                   segment_lengths=[256, 512], dilation_rates=[1, 2], dropout=0.0,
                   device="cuda", dtype=torch.bfloat16)  # fmt: skip
    tokens = torch.randint(0, 1000, (2, 1024), device="cuda")
    eager = lm(tokens)
    compiled = torch.compile(lm, fullgraph=True)(tokens)
    assert_close_to_reference(compiled, eager.double(), torch.bfloat16)
    (g_eager,) = torch.autograd.grad(eager.float().square().mean(), lm.embedding.weight)
    (g_compiled,) = torch.autograd.grad(compiled.float().square().mean(), lm.embedding.weight)
    assert_close_to_reference(g_compiled, g_eager.double(), torch.bfloat16, "d embedding")


def _decoder_lm(dtype: torch.dtype, attention_type: str = "auto") -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(num_tokens=512, d_model=256, nhead=4, num_kv_heads=2, num_decoder_layers=2,
                     segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4], dropout=0.0,
                     attention_type=attention_type, device="cuda", dtype=dtype).eval()  # fmt: skip


def _prompt(length: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(length)
    return torch.randint(0, 512, (2, length), device="cuda", generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_equals_the_eager_step(dtype: torch.dtype) -> None:
    """The captured step replays the eager step's kernels: teacher-forced over 300 positions
    (crossing every segment boundary of 64, 128 and 256), the same logits."""
    model = _decoder_lm(dtype)
    ids = _prompt(345)
    graph = StaticDecoder(model, 2, 345)
    eager = StaticDecoder(model, 2, 345, cuda_graph=False)
    assert graph.cuda_graph and not eager.cuda_graph
    torch.testing.assert_close(graph.prefill(ids[:, :45]), eager.prefill(ids[:, :45]))
    for t in range(45, 345):
        got, want = graph.step(ids[:, t]), eager.step(ids[:, t])
        assert_close_to_reference(got, want.double(), dtype, f"logits at {t}")


def test_fast_generate_equals_cached_and_uncached_on_gpu() -> None:
    # float32 and the reference attention for the recomputation, so that greedy ties are out
    # of reach; 45 + 250 tokens cross every segment boundary.
    model = _decoder_lm(torch.float32, attention_type="standard")
    ids = _prompt(45)
    fast = generate(model, ids, 250, fast=True)
    assert torch.equal(fast, generate(model, ids, 250, fast=False))
    assert torch.equal(fast, generate(model, ids, 250))  # the default on CUDA: fast
    assert torch.equal(fast, generate(model, ids, 250, use_cache=False))
    # A held decoder replays its graph for another prompt.
    decoder = StaticDecoder(model, 2, 295)
    logits = decoder.prefill(ids)
    tokens = []
    for _ in range(250):
        tokens.append(logits.argmax(-1))
        if decoder.length < decoder.max_length:
            logits = decoder.step(tokens[-1])
    assert torch.equal(torch.stack(tokens, dim=1), fast[:, 45:])
