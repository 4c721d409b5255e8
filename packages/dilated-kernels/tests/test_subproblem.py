"""The shared sub-problem primitive against dense float64 attention, forward and backward.

A dense problem is cut into key parts; each part goes through ``subproblem_attention``, the parts
are merged with ``merge_into``, and each part's backward gets the FINAL merged output and LSE.
The merged output and the summed gradients must equal plain attention over all keys, which is
what every caller (cudnn backend, ring steps, sparse blocks, KV cache) relies on. On CPU this is
the plain-PyTorch fallback; on CUDA (``gpu`` marker) the cuDNN engine.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.merge import merge_into
from dilated.core.reference import dropout_keep_mask
from dilated.core.testing import assert_close_to_reference
from dilated.kernels import subproblem_attention, subproblem_attention_backward
from dilated.kernels.subproblem import cudnn_supports


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    allowed: torch.Tensor,
    keep: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """float64 attention over ``(B, L, H, D)`` with a bool ``(B, H, L, L_k)`` mask of allowed pairs."""
    group = q.shape[2] // k.shape[2]
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return (p @ vd).transpose(1, 2)


def _check(
    b: int,
    lq: int,
    lk: int,
    h: int,
    hkv: int,
    d: int,
    *,
    causal: bool,
    masked: bool,
    cuts: list[int],
    dropout_p: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=gen).to(device, dtype)
    k = torch.randn(b, lk, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(b, lk, hkv, d, generator=gen).to(device, dtype)
    g = torch.randn(b, lq, h, d, generator=gen).to(device, dtype)
    mask = (torch.rand(b, lk, generator=gen) > 0.3).to(device) if masked else None
    scale = d**-0.5
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if mask is not None:
        allowed &= mask[:, None, None, :]
    # Key parts [c_i, c_{i+1}); a causal part keeps top-left alignment only on the diagonal, so
    # causal calls use one part covering all keys (other alignments are the callers' business).
    bounds = [0, *cuts, lk] if not causal else [0, lk]
    keep_parts = []
    acc = torch.zeros(b, lq, h, d, dtype=torch.float32, device=device)
    acc_lse = torch.full((b, h, lq), float("-inf"), device=device)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        seed_i = None if dropout_p == 0 else 1000 + i
        part_mask = None if mask is None else mask[:, lo:hi]
        o, lse = subproblem_attention(
            q, k[:, lo:hi], v[:, lo:hi], scale=scale, is_causal=causal, key_mask=part_mask,
            dropout_p=dropout_p, dropout_seed=seed_i,
        )  # fmt: skip
        assert o.dtype == dtype and lse.dtype == torch.float32
        assert o.shape == (b, lq, h, d) and lse.shape == (b, h, lq)
        merge_into(acc, acc_lse, o, lse)
        if seed_i is not None:
            keep_parts.append(dropout_keep_mask((b, h, lq, hi - lo), dropout_p, seed_i, q.device))
    keep = torch.cat(keep_parts, -1) if keep_parts else None
    out = acc.to(dtype)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _dense(qr, kr, vr, scale, allowed, keep, dropout_p)
    assert_close_to_reference(out, ref, dtype, "out")
    assert not torch.isnan(acc_lse).any()
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        part_mask = None if mask is None else mask[:, lo:hi]
        gq, gk, gv = subproblem_attention_backward(
            g, q, k[:, lo:hi], v[:, lo:hi], out, acc_lse, scale=scale, is_causal=causal,
            key_mask=part_mask, dropout_p=dropout_p,
            dropout_seed=None if dropout_p == 0 else 1000 + i,
        )  # fmt: skip
        assert gq.shape == q.shape and gk.shape == (b, hi - lo, hkv, d)
        dq += gq.float()
        dk[:, lo:hi] += gk.float()
        dv[:, lo:hi] += gv.float()
    expected = torch.autograd.grad(ref, (qr, kr, vr), g.double())
    for name, a, e in zip("qkv", (dq, dk, dv), expected):
        assert_close_to_reference(a, e, dtype, f"d{name}")


@pytest.mark.parametrize(
    ("b", "lq", "lk", "h", "hkv", "d", "cuts"),
    [
        (2, 7, 7, 2, 2, 8, [3]),
        (1, 5, 12, 4, 2, 16, [4, 9]),  # GQA, three key parts
        (2, 9, 9, 4, 1, 8, [1]),  # MQA, a one-key part
        (1, 1, 6, 2, 2, 8, [2]),  # a single query row (decoding)
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_parts_merge_into_dense_attention(
    b: int, lq: int, lk: int, h: int, hkv: int, d: int, cuts: list[int], masked: bool
) -> None:
    _check(b, lq, lk, h, hkv, d, causal=False, masked=masked, cuts=cuts)


@pytest.mark.parametrize(("hkv", "masked"), [(4, False), (2, True)])
def test_causal_diagonal(hkv: int, masked: bool) -> None:
    _check(2, 11, 11, 4, hkv, 8, causal=True, masked=masked, cuts=[])


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_is_replayed_in_backward(causal: bool) -> None:
    _check(2, 6, 10 if not causal else 6, 2, 1, 8, causal=causal, masked=True, cuts=[4],
           dropout_p=0.3)  # fmt: skip


def test_fully_masked_rows_are_zero_with_finite_gradients() -> None:
    q = torch.randn(1, 3, 2, 8, requires_grad=False)
    k = torch.randn(1, 4, 2, 8)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    out, lse = subproblem_attention(q, k, k, scale=0.3, key_mask=mask)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    grads = subproblem_attention_backward(
        torch.ones_like(q), q, k, k, out, lse, scale=0.3, key_mask=mask
    )
    assert all(torch.equal(g_, torch.zeros_like(g_)) for g_ in grads)


def test_dropout_needs_a_seed() -> None:
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="dropout_seed"):
        subproblem_attention(q, q, q, scale=1.0, dropout_p=0.1)


def test_strided_views_are_read_in_place() -> None:
    # Rows 1, 4, 7, ... of heads 1, 4 of a (b, n, h, d) tensor: the dilated sub-problem layout.
    x = torch.randn(2, 24, 6, 8)
    view = x[:, 1::3, 1::3]
    assert not view.is_contiguous()
    out, _ = subproblem_attention(view, view, view, scale=0.5)
    ref, _ = subproblem_attention(
        view.contiguous(), view.contiguous(), view.contiguous(), scale=0.5
    )
    torch.testing.assert_close(out, ref)


@settings(max_examples=10, deadline=None)
@given(
    st.integers(1, 2),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_random_parts(
    b: int, lq: int, lk: int, heads: tuple[int, int], masked: bool, seed: int
) -> None:
    cuts = sorted({seed % lk, (seed // 7) % lk} - {0})
    _check(b, lq, lk, heads[0], heads[1], 8, causal=False, masked=masked, cuts=cuts, seed=seed)


def test_cudnn_eligibility_rules() -> None:
    q = torch.randn(1, 4, 2, 8)
    assert not cudnn_supports(q, q)  # CPU tensors never go to cuDNN


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("hkv", "d"), [(4, 64), (2, 128), (4, 32)])
def test_cudnn_engine(dtype: torch.dtype, hkv: int, d: int) -> None:
    q = torch.randn(1, 8, 4, d, device="cuda", dtype=dtype)
    assert cudnn_supports(q, q)
    _check(2, 64, 96, 4, hkv, d, causal=False, masked=False, cuts=[32], dtype=dtype, device="cuda")
    _check(2, 64, 64, 4, hkv, d, causal=True, masked=False, cuts=[], dtype=dtype, device="cuda")
