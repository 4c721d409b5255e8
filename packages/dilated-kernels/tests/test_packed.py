"""Packed batches (``cu_seqlens``) on every backend that runs here: each sequence exactly as a
call on that sequence alone, forward and backward."""

from __future__ import annotations

import itertools

import pytest
import torch

from dilated.core.testing import assert_close_to_reference, make_inputs
from dilated.kernels import available_backends, dilated_attention
from dilated.kernels.modules import ImprovedMultiheadDilatedAttention

BACKENDS = [name for name in available_backends("cpu") if name != "flash"]
BOUNDS = [0, 9, 9, 40, 47]  # an empty sequence, odd lengths, one longer than every segment


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_each_sequence_alone(backend: str, causal: bool) -> None:
    ws, rs = (8, 16), (1, 2)
    x = make_inputs(1, BOUNDS[-1], 4, 16, kv_heads=2, requires_grad=True, seed=7)
    out = dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=causal, cu_seqlens=torch.tensor(BOUNDS), backend=backend
    )
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x.q, x.k, x.v), g)
    alone, grads = [], []
    for a, b in itertools.pairwise(BOUNDS):
        if b == a:
            continue
        part = [t.detach()[:, a:b].requires_grad_() for t in (x.q, x.k, x.v)]
        o = dilated_attention(*part, ws, rs, is_causal=causal, backend=backend)
        alone.append(o)
        grads.append(torch.autograd.grad(o, part, g[:, a:b]))
    assert_close_to_reference(out, torch.cat(alone, 1), torch.float32)
    for i, name in enumerate(("dq", "dk", "dv")):
        want = torch.cat([gr[i] for gr in grads], 1)
        assert_close_to_reference(got[i], want, torch.float32, name)


def test_multihead_module_takes_cu_seqlens() -> None:
    mha = ImprovedMultiheadDilatedAttention(32, 4, [1, 2], [8, 16])
    h = torch.randn(1, 30, 32)
    out, _ = mha(h, h, h, is_causal=True, cu_seqlens=[0, 11, 30])
    parts = [
        mha(h[:, a:b], h[:, a:b], h[:, a:b], is_causal=True)[0] for a, b in ((0, 11), (11, 30))
    ]
    torch.testing.assert_close(out, torch.cat(parts, 1))


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("heads", [4, 6])  # kv heads 2: grouped, and expanded once (group 3)
@pytest.mark.parametrize("lse_grad", [False, True])
def test_packed_in_one_call_with_mask_and_lse(heads: int, lse_grad: bool) -> None:
    # The strided backend takes the whole packed batch in one op: each sequence's rows are
    # written in place. A key padding mask and a gradient on the LSE (the Triton backward,
    # per sequence) follow the sequences too.
    ws, rs = (4, 8, 32), (1, 2, 4)
    x = make_inputs(1, BOUNDS[-1], heads, 16, kv_heads=2, requires_grad=True, seed=heads)
    pad = torch.zeros(1, BOUNDS[-1], dtype=torch.bool)
    pad[0, 5:9] = pad[0, 30:33] = True  # True = a key to ignore (PyTorch's convention)
    out, lse = dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=True, key_padding_mask=pad, return_lse=True,
        cu_seqlens=BOUNDS, backend="cudnn",
    )  # fmt: skip
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad(
        (out, lse) if lse_grad else out, (x.q, x.k, x.v), (g, gl) if lse_grad else g
    )
    for a, b in itertools.pairwise(BOUNDS):
        if b == a:
            continue
        part = [t.detach()[:, a:b].double().requires_grad_() for t in (x.q, x.k, x.v)]
        o, m = dilated_attention(
            *part, ws, rs, is_causal=True, key_padding_mask=pad[:, a:b], return_lse=True,
            backend="reference",
        )  # fmt: skip
        want = torch.autograd.grad(
            (o, m) if lse_grad else o, part,
            (g[:, a:b].double(), gl[:, :, a:b].double()) if lse_grad else g[:, a:b].double(),
        )  # fmt: skip
        assert_close_to_reference(out[:, a:b], o, torch.float32)
        finite = torch.isfinite(m)
        assert torch.equal(torch.isfinite(lse[:, :, a:b]), finite)
        assert_close_to_reference(lse[:, :, a:b][finite], m[finite], torch.float32, "lse")
        for i, name in enumerate(("dq", "dk", "dv")):
            assert_close_to_reference(got[i][:, a:b], want[i], torch.float32, name)


@pytest.mark.usefixtures("interpret")
def test_module_packs_in_one_op_on_the_strided_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from dilated.kernels import strided_run
    from dilated.kernels.modules import ImprovedDilatedAttention

    calls = []
    forward = strided_run.forward
    monkeypatch.setattr(strided_run, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    attention = ImprovedDilatedAttention([8, 16], [1, 2], is_causal=True, backend="cudnn")
    x = make_inputs(1, BOUNDS[-1], 4, 16, seed=2)
    out = attention(x.q, x.k, x.v, cu_seqlens=BOUNDS)
    assert len(calls) == 1  # the whole packed batch, not one op per sequence
    for a, b in itertools.pairwise(BOUNDS):
        if b > a:
            alone = attention(x.q[:, a:b], x.k[:, a:b], x.v[:, a:b])
            assert_close_to_reference(out[:, a:b], alone.double(), torch.float32)
