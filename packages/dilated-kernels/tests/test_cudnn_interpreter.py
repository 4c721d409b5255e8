"""The ``"cudnn"`` backend's planning and Triton gather kernels on CPU, against the dense judge.

Without CUDA the backend replaces each cuDNN call by the same dense math in PyTorch and runs its
Triton merge/sum kernels under ``TRITON_INTERPRET=1``; everything but the cuDNN calls themselves
(covered on the GPU by ``test_gpu.py``) is exercised here: chunking, partial last segments, batch
merging, phases, causal, the LSE merge and the gradient sums.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    make_inputs,
)
from dilated.kernels import dilated_attention, strided_plan

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA present: the cuDNN path is tested in test_gpu.py"
    ),
    pytest.mark.usefixtures("interpret"),
]


def _check(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    *,
    causal: bool,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, batch, seq, heads, head_dim, ws, rs, is_causal=causal, dtype=dtype, seed=seed
    )


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "head_dim", "ws", "rs"),
    [
        (2, 16, 2, 16, (4, 8), (1, 2)),  # whole segments: batch merged into one call
        (2, 19, 4, 16, (4, 8, 16), (1, 2, 4)),  # partial last segments: one call per batch
        (1, 40, 2, 32, (16, 32), (1, 2)),  # every w a multiple of 16: one table row per block
        (2, 70, 4, 16, (32, 64), (2, 4)),
        (2, 12, 2, 16, (32,), (8,)),  # more phases than heads: uncovered rows stay 0 / -inf
        (1, 5, 3, 8, (4, 6), (2, 3)),  # head_dim below the block, non-nested segments
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
) -> None:
    _check(batch, seq, heads, head_dim, ws, rs, causal=causal)


def test_chunked_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny chunk budget forces several chunks (segments of every branch inside each).
    monkeypatch.setattr(strided_plan, "CHUNK_ELEMENTS", 8 * 2 * 16)
    assert len(strided_plan.chunks(2, 44, 2, 16, (4, 8))) > 1
    _check(2, 44, 2, 16, (4, 8), (1, 2), causal=True)


def test_long_range_takes_several_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA caps the grid's second dimension; a small cap here forces the split.
    monkeypatch.setattr(strided_plan, "_MAX_GRID_Y", 2)
    assert len(strided_plan.gather_launches((16, 32), (1, 2), 2, 0, 100, 1, 2, 16)) > 1
    _check(1, 100, 2, 16, (16, 32), (1, 2), causal=False)
    _check(1, 50, 2, 16, (4, 12), (1, 3), causal=True)


def test_bfloat16() -> None:
    _check(1, 24, 4, 16, (8, 16), (1, 4), causal=True, dtype=torch.bfloat16)


def test_gradient_through_lse() -> None:
    # A loss on the returned LSE (as ring merges use it) takes the triton backward path.
    inp = make_inputs(1, 16, 2, 16, requires_grad=True, seed=3)
    ref_inp = [x.detach().clone().requires_grad_() for x in (inp.q, inp.k, inp.v)]
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, (4, 8), (1, 2), return_lse=True, backend="cudnn"
    )
    ref_out, ref_lse = dilated_attention(
        *ref_inp, (4, 8), (1, 2), return_lse=True, backend="reference"
    )
    (out.sum() + lse.sum()).backward()
    (ref_out.sum() + ref_lse.sum()).backward()
    for name, got, want in zip("qkv", (inp.q, inp.k, inp.v), ref_inp):
        assert got.grad is not None and want.grad is not None
        assert_close_to_reference(got.grad, want.grad.double(), torch.float32, f"d{name}")


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq=st.integers(1, 40),
    heads=st.integers(1, 4),
    branches=st.lists(
        st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 4])), min_size=1, max_size=3
    ),
    causal=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_configs(
    batch: int,
    seq: int,
    heads: int,
    branches: list[tuple[int, int]],
    causal: bool,
    seed: int,
) -> None:
    ws = tuple(m * r * 2 for m, r in branches)
    rs = tuple(r for _, r in branches)
    _check(batch, seq, heads, 16, ws, rs, causal=causal, seed=seed)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "ws", "rs"),
    [
        (4, 2, (4, 8, 16), (1, 2, 4)),  # group 2: rate 1 shares heads, rates 2 and 4 stride them
        (8, 2, (8, 16), (2, 8)),  # group 4: rate 2 shares, rate 8 strides by 2
        (4, 2, (8, 32), (1, 8)),  # more phases than heads
        (6, 2, (4, 8), (1, 2)),  # group 3 with rate 2: neither divides, heads expanded once
        (4, 1, (4, 8), (1, 4)),  # multi-query
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_grouped_query_and_padding_match_dense(
    heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
    padding: bool,
) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, 2, 37, heads, 16, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=padding, seed=heads + kv_heads,
    )  # fmt: skip


def test_fully_padded_rows_are_zero_with_finite_gradients() -> None:
    inp = make_inputs(2, 24, 4, 16, kv_heads=2, requires_grad=True, seed=4)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[0, :16] = True  # the first two segments of w=8 see no key at all
    mask[1] = True
    out, lse = dilated_attention(
        inp.q, inp.k, inp.v, (8,), (1,), key_padding_mask=mask, return_lse=True, backend="cudnn"
    )
    assert bool((out[0, :16] == 0).all()) and bool((out[1] == 0).all())
    assert bool(torch.isinf(lse[0, :, :16]).all()) and bool(torch.isfinite(lse[0, :, 16:]).all())
    grads = torch.autograd.grad(out.square().sum(), (inp.q, inp.k, inp.v))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][1] == 0).all())


def test_dropout_is_seeded_and_its_gradient_is_the_derivative() -> None:
    """Reproducible under ``torch.manual_seed``, really dropping, and the backward pass replays
    the forward's masks (central difference of the same draw), grouped heads included."""
    x = make_inputs(1, 20, 4, 16, kv_heads=2, seed=5)
    ins = [t.detach().requires_grad_() for t in (x.q, x.k, x.v)]
    direction = [torch.randn_like(t) for t in ins]
    g = torch.randn_like(x.q)

    def value(eps: float, p: float = 0.4) -> torch.Tensor:
        torch.manual_seed(11)
        moved = [t + eps * d for t, d in zip(ins, direction)]
        out = dilated_attention(
            *moved, [4, 8], [1, 2], is_causal=True, dropout_p=p, backend="cudnn"
        )
        return (out * g).sum()

    base = value(0.0)
    assert torch.equal(base, value(0.0))
    assert not torch.allclose(base, value(0.0, p=0.0))
    grads = torch.autograd.grad(base, ins)
    # float32 (the interpreter's cudnn path): rounding bounds the central difference's accuracy.
    eps = 1e-2
    numeric = (value(eps) - value(-eps)).item() / (2 * eps)
    analytic = sum((gr * d).sum().item() for gr, d in zip(grads, direction))
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_kv_head_layouts() -> None:
    # Which key/value heads each phase reads: the query heads of the phase, divided by the group.
    for h, g, r in [(8, 2, 1), (8, 2, 2), (8, 2, 4), (8, 4, 8), (16, 4, 2), (4, 2, 8)]:
        for phase in range(min(r, h)):
            first, step, count = strided_plan.kv_heads(phase, r, h, g)
            wanted = sorted({j // g for j in range(phase, h, r)})
            got = list(range(first, first + step * count, step))
            # A group that is a multiple of r reads every kv head for g / r query heads each.
            assert sorted(set(got)) == wanted, (h, g, r, phase)
    assert strided_plan.kv_layout(6, 2, (1, 2)) == "expand"
    assert strided_plan.kv_layout(8, 2, (1, 2, 4)) == "grouped"
    assert strided_plan.kv_layout(8, 8, (3,)) == "mha"


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "ws", "rs"),
    [
        (1, 24, 4, 4, (8, 16, 32), (1, 2, 4)),  # one segment: phases on the batch axis
        (1, 22, 4, 4, (8, 16, 32), (1, 2, 4)),  # a tail of 22 rows: phases of 6 and of 5 rows
        (2, 22, 4, 4, (8, 16, 32), (1, 2, 4)),  # two batch rows, r >= heads: phases on heads
        (2, 32, 2, 2, (8, 16), (2, 4)),  # several segments, r >= heads: phases on heads
        (1, 20, 6, 6, (4, 8), (1, 4)),  # phases of 2 and of 1 query heads
        (1, 16, 8, 2, (8, 16), (2, 4)),  # group 4: every phase reads all key/value heads
        (1, 16, 8, 4, (8, 16), (4, 8)),  # group 2, rates 4 and 8: strided key/value heads
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_calls_that_hold_several_phases_match_dense(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
    padding: bool,
) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="cudnn")
    check_on_random_inputs(
        attention, batch, seq, heads, 16, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=padding, seed=seq + heads,
    )  # fmt: skip


def _calls(b: int, n: int, h: int, ws: tuple[int, ...], rs: tuple[int, ...]) -> int:
    return sum(len(strided_plan.plan(b, n, h, ws, rs, t0, t1)) for t0, t1 in [(0, n)])


def test_short_sequences_take_one_call_per_branch() -> None:
    # 4K tokens, 16 heads: each branch's phases share one call (7 calls, one per phase, before).
    assert _calls(1, 4096, 16, (2048, 4096, 8192), (1, 2, 4)) == 3
    # Every phase of the branches of rate 16 and more has one head: one call per branch at any
    # batch size and length.
    ws, rs = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 16, 32)
    for b in (1, 3):
        assert _calls(b, 32768, 16, ws, rs) == _calls(b, 32768, 16, ws[:3], rs[:3]) + 2


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("seq", [8192, 8000])
def test_segments_longer_than_the_sequence_cost_the_cut_call(batch: int, seq: int) -> None:
    # longnet_1m's branches on 8K tokens: those longer than the sequence make as many engine
    # calls as the same branches with their segments cut to the sequence (the same math).
    ws, rs = (4096, 16384, 65536, 262144, 1048576), (1, 4, 16, 64, 256)
    cut = tuple(min(w, -(-seq // r) * r) for w, r in zip(ws, rs))
    assert _calls(batch, seq, 16, ws, rs) == _calls(batch, seq, 16, cut, rs)
    if batch == 1 and seq == 8192:
        assert _calls(batch, seq, 16, ws, rs) == len(ws)  # one call per branch


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the same values in a ``(batch, heads, seq, head_dim)`` memory layout, seen as
    ``(batch, seq, heads, head_dim)`` (how transformers hands its tensors over)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "ws", "rs"),
    [
        (2, 32, 4, 4, (8, 16), (1, 2)),  # segments tile the sequence: batch rows not one stride
        (2, 30, 4, 2, (8, 16), (1, 4)),  # tails, grouped key/value heads
        (1, 24, 4, 4, (8, 32), (1, 4)),  # phases on the batch axis
        (2, 32, 2, 2, (8, 16), (2, 4)),  # phases on the head axis
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_heads_first_layout_is_read_in_place(
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    causal: bool,
) -> None:
    from dilated.kernels.strided_run import readable

    probe = _heads_first(torch.randn(batch, seq, heads, 16))
    assert readable(probe) is probe  # no copy: the views below read this layout

    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = dilated_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), *args, return_lse=True,
            backend="cudnn", **kwargs,
        )  # fmt: skip
        return out, lse

    check_on_random_inputs(
        attention, batch, seq, heads, 16, ws, rs, kv_heads=kv_heads, is_causal=causal,
        padding=True, seed=seq,
    )  # fmt: skip


def test_readable_copies_what_the_engines_cannot_read() -> None:
    from dilated.kernels.strided_run import readable

    x = torch.randn(2, 8, 4, 16)
    assert readable(x) is x
    odd = torch.randn(2, 8, 4, 17)[..., :16]  # strides not a multiple of 16 bytes
    assert readable(odd) is not odd and readable(odd).is_contiguous()
    overlapping = torch.randn(1, 1, 1, 16).expand(2, 8, 4, 16)  # zero strides
    assert readable(overlapping) is not overlapping
    assert torch.equal(readable(odd), odd)


def test_output_gradient_in_another_layout_than_the_output() -> None:
    # transformers' case: heads-first q/k/v give a heads-first output, whose gradient comes back
    # (batch, seq, heads, head_dim)-contiguous; the backward reads dO in O's layout.
    x = make_inputs(2, 24, 4, 16, requires_grad=True, seed=8)
    inputs = [_heads_first(t) for t in (x.q, x.k, x.v)]
    out = dilated_attention(*inputs, (8, 16), (1, 2), is_causal=True, backend="cudnn")
    assert out.stride() != out.contiguous().stride()
    g = torch.randn(out.shape)  # contiguous: another layout than out's
    got = torch.autograd.grad(out, (x.q, x.k, x.v), g)
    ref = [t.detach().double().requires_grad_() for t in (x.q, x.k, x.v)]
    want_out = dilated_attention(*ref, (8, 16), (1, 2), is_causal=True, backend="reference")
    want = torch.autograd.grad(want_out, ref, g.double())
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(a, e, torch.float32, name)
