"""Dilated attention as one part of a merge (``dilated.kernels.partial``) against the dense judge.

The ring splits the branches into parts, merges their forward results by log-sum-exp and runs
each part's backward with the FINAL merged output and LSE; the merged output and the summed
gradients must be those of the whole. On CPU the generic path (one primitive call per branch,
phase and run of segments) runs; the fused cuDNN path is checked by the ``gpu`` test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.branches import run_branches
from dilated.core.merge import merge_into
from dilated.core.reference import dense_segment_attention
from dilated.core.testing import assert_close_to_reference, dense_dilated_attention, make_inputs
from dilated.kernels.partial import dilated_attention_backward, dilated_attention_forward


def _split_and_merge(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    ws: list[int],
    rs: list[int],
    split: int,
    *,
    causal: bool,
    masked: bool,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> None:
    x = make_inputs(batch, seq, heads, 16, kv_heads=kv_heads, dtype=dtype, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed + 1)
    # The primitives take the internal form (True = a key that may be attended); the judge, like
    # every public op, PyTorch's (True = padding).
    mask = (torch.rand(batch, seq, generator=gen) > 0.25).to(device) if masked else None
    padding = None if mask is None else ~mask
    scale = 16**-0.5
    parts = [(ws[:split], rs[:split]), (ws[split:], rs[split:])]
    parts = [p for p in parts if p[0]]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.zeros(x.q.shape, dtype=work, device=device)
    acc_lse = torch.full((batch, heads, seq), float("-inf"), dtype=work, device=device)
    for pw, pr in parts:
        o, lse = dilated_attention_forward(
            x.q, x.k, x.v, pw, pr, scale=scale, is_causal=causal, key_padding_mask=mask
        )
        merge_into(acc, acc_lse, o, lse)
    out = acc.to(dtype)
    q, k, v = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    ref, ref_lse = dense_dilated_attention(
        q, k, v, ws, rs, scale=scale, is_causal=causal, key_padding_mask=padding
    )
    assert_close_to_reference(out, ref, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(acc_lse), finite)
    torch.testing.assert_close(acc_lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-3)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
    expected = torch.autograd.grad(ref, (q, k, v), g)
    grads = [torch.zeros(t.shape, dtype=work, device=device) for t in (x.q, x.k, x.v)]
    for pw, pr in parts:
        part = dilated_attention_backward(
            g.to(dtype), x.q, x.k, x.v, out, acc_lse, pw, pr, scale=scale, is_causal=causal,
            key_padding_mask=mask,
        )  # fmt: skip
        for total, share in zip(grads, part):
            total += share
    for name, a, e in zip("qkv", grads, expected):
        assert_close_to_reference(a, e, dtype, f"d{name}")


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "ws", "rs", "split"),
    [
        (2, 16, 4, 4, [4, 8, 16], [1, 2, 4], 1),
        (1, 19, 4, 2, [4, 8], [1, 2], 1),  # GQA, short last segments
        (2, 24, 6, 3, [8, 24], [2, 3], 2),  # one part holds every branch
        (1, 13, 2, 1, [32], [8], 0),  # more phases than heads, one segment longer than seq
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_parts_merge_to_the_whole(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    ws: list[int],
    rs: list[int],
    split: int,
    causal: bool,
    masked: bool,
) -> None:
    _split_and_merge(batch, seq, heads, kv_heads, ws, rs, split, causal=causal, masked=masked)


def test_float64_stays_float64() -> None:
    _split_and_merge(
        1, 12, 2, 2, [4, 12], [1, 2], 1, causal=True, masked=False, dtype=torch.float64
    )


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([([4, 8], [1, 2]), ([6, 12], [2, 3]), ([2, 8, 16], [1, 2, 4])]),
    st.integers(5, 20),
    st.booleans(),
    st.integers(0, 1000),
)
def test_random_splits(
    branches: tuple[list[int], list[int]], seq: int, causal: bool, seed: int
) -> None:
    ws, rs = branches
    _split_and_merge(2, seq, 4, 2, ws, rs, seed % len(ws), causal=causal, masked=seed % 2 == 0)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_head_offset_takes_the_global_phase(offset: int) -> None:
    """Heads ``offset..offset+2`` of a 6-head layer, computed alone with ``head_offset``."""
    x = make_inputs(1, 24, 6, 8, seed=offset)
    ws, rs = [8, 24], [2, 3]
    ref, ref_lse = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=True)
    heads = slice(offset, offset + 2)
    q, k, v = (t[:, :, heads].contiguous() for t in (x.q, x.k, x.v))
    out, lse = dilated_attention_forward(
        q, k, v, ws, rs, scale=8**-0.5, is_causal=True, head_offset=offset
    )
    assert_close_to_reference(out, ref[:, :, heads], torch.float32)
    finite = torch.isfinite(ref_lse[:, heads])
    torch.testing.assert_close(lse[finite].double(), ref_lse[:, heads][finite], atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_backward_replays_the_forward_masks(causal: bool) -> None:
    """With a seed, forward and backward drop the same probabilities: the gradients equal
    autograd through the same seeded computation."""
    x = make_inputs(2, 16, 4, 8, kv_heads=2, seed=3)
    ws, rs, p, seed = [4, 16], [1, 2], 0.25, 1234
    out, lse = dilated_attention_forward(
        x.q, x.k, x.v, ws, rs, scale=0.3, is_causal=causal, dropout_p=p, dropout_seed=seed
    )
    calls = 0

    def seeded(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        calls += 1
        return dense_segment_attention(*args, dropout_seed=seed + calls - 1)  # type: ignore[arg-type]

    q, k, v = (t.detach().requires_grad_() for t in (x.q, x.k, x.v))
    ref, ref_lse = run_branches(
        q, k, v, ws, rs, scale=0.3, is_causal=causal, key_padding_mask=None, dropout_p=p,
        dense=seeded,
    )  # fmt: skip
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(lse, ref_lse)
    assert not torch.equal(out, dilated_attention_forward(
        x.q, x.k, x.v, ws, rs, scale=0.3, is_causal=causal)[0])  # fmt: skip
    g = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (q, k, v), g)
    got = dilated_attention_backward(
        g, x.q, x.k, x.v, out, lse, ws, rs, scale=0.3, is_causal=causal, dropout_p=p,
        dropout_seed=seed,
    )  # fmt: skip
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_cudnn_parts(dtype: torch.dtype, causal: bool) -> None:
    for kv_heads, masked in ((8, False), (4, False), (8, True)):
        _split_and_merge(
            2, 4096 + 96, 8, kv_heads, [512, 1024, 2048], [1, 2, 4], 1, causal=causal,
            masked=masked, dtype=dtype, device="cuda",
        )  # fmt: skip
