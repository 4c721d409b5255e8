"""Backend selection, errors, the "improved" modules and their registry entry."""

from __future__ import annotations

import logging

import pytest
import torch

from dilated.core import registry
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.kernels import (
    BACKEND_NAMES,
    IMPLEMENTATION,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    available_backends,
    dilated_attention,
)
from dilated.kernels.backends import choose_backend
from dilated.kernels.engines import flash4


def test_unknown_backend_lists_valid_names() -> None:
    inp = make_inputs(1, 8, 2, 4, seed=0)
    with pytest.raises(ValueError) as err:
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], backend="cutlass")
    for name in BACKEND_NAMES:
        assert repr(name) in str(err.value) or name in str(err.value)
    assert "cutlass" in str(err.value)


def test_auto_on_cpu_is_reference(caplog: pytest.LogCaptureFixture) -> None:
    inp = make_inputs(1, 8, 2, 4, seed=0)
    with caplog.at_level(logging.DEBUG, logger="dilated.kernels.backends"):
        assert choose_backend(inp.q, inp.k, None, 0.0) == "reference"
    assert "reference" in caplog.text
    assert available_backends("cpu")[-2:] == ["sdpa", "reference"]


def test_invalid_inputs_rejected_like_core() -> None:
    inp = make_inputs(1, 8, 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"dilation_rates|segment"):
        dilated_attention(inp.q, inp.k, inp.v, [6], [4], backend="sdpa")
    bad = inp.q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q holds NaN or Inf"):
        dilated_attention(bad, inp.k, inp.v, [4], [1], backend="sdpa", check_finite=True)


@pytest.mark.skipif(flash4.installed(), reason="flash-attn-4 is installed here")
def test_flash_missing_says_how_to_install_it() -> None:
    inp = make_inputs(1, 8, 2, 4, seed=0)
    with pytest.raises(
        ValueError, match=r"backend='flash'.*pip install 'dilated-kernels\[flash\]'"
    ):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], backend="flash")


def test_registry_entry() -> None:
    impls = registry.available_implementations()
    assert impls["improved"] is IMPLEMENTATION or impls["improved"] == IMPLEMENTATION
    assert registry.get_implementation("auto", "cpu").name == "standard"
    assert registry.get_implementation("auto", "cuda").name == "improved"


def test_modules_match_dense() -> None:
    inp = make_inputs(2, 20, 4, 8, kv_heads=2, seed=3)
    mod = ImprovedDilatedAttention([8, 16], [1, 2], backend="sdpa")
    out = mod(inp.q, inp.k, inp.v, is_causal=True)
    ref, _ = dense_dilated_attention(
        inp.q.double(), inp.k.double(), inp.v.double(), [8, 16], [1, 2], is_causal=True
    )
    assert_close_to_reference(out, ref, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        ImprovedDilatedAttention([8], [1], backend="nope")


def test_factory_builds_improved_multihead() -> None:
    mha = registry.create_multihead_dilated_attention(
        "improved", embed_dim=32, num_heads=4, segment_lengths=[8], dilation_rates=[1]
    )
    assert isinstance(mha, ImprovedMultiheadDilatedAttention)
    x = torch.randn(2, 16, 32)
    out, weights = mha(x, x, x)
    assert out.shape == (2, 16, 32) and weights is None
    out.sum().backward()
    assert mha.q_proj.weight.grad is not None


def test_improved_multihead_hands_backend_to_its_attention() -> None:
    mha = registry.create_multihead_dilated_attention(
        "improved", embed_dim=32, num_heads=4, segment_lengths=[8], dilation_rates=[1],
        backend="reference", dtype=torch.float64,
    )  # fmt: skip
    assert isinstance(mha.attention, ImprovedDilatedAttention)
    assert mha.attention.backend == "reference"
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    q, k, v = mha.project_inputs(x, x, x)
    heads, _ = dense_dilated_attention(q, k, v, [8], [1], is_causal=True)
    assert_close_to_reference(
        mha(x, x, x, is_causal=True)[0], mha.project_output(heads), torch.float64
    )
    with pytest.raises(ValueError, match="backend must be one of"):
        ImprovedMultiheadDilatedAttention(32, 4, [1], [8], backend="cutlass")


def test_improved_module_compiles_with_fullgraph() -> None:
    """No graph break in the dispatcher (its debug log is skipped while compiling): the
    compiled module equals eager, forward and backward."""
    attn = ImprovedDilatedAttention([4, 8], [1, 2])
    x = make_inputs(1, 16, 4, 8, requires_grad=True, seed=2)
    eager = attn(x.q, x.k, x.v, is_causal=True)
    compiled = torch.compile(attn, fullgraph=True)(x.q, x.k, x.v, is_causal=True)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (x.q, x.k, x.v), g)
    got = torch.autograd.grad(compiled, (x.q, x.k, x.v), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
