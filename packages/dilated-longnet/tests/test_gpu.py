"""LongNetLM on CUDA with its defaults (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dilated.core.testing import assert_close_to_reference
from dilated.longnet import LongNetLM

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
