"""Every dense engine installed on this GPU against float64 attention, forward and backward,
on strided views, and the ``"flash"`` backend (flash-attn-4) against the dense judge."""

from __future__ import annotations

import functools

import pytest
import torch

from dilated.core.merge import merge_into as merge_into_reference
from dilated.core.reference import dense_segment_attention
from dilated.core.testing import assert_close_to_reference, check_on_random_inputs, make_inputs
from dilated.kernels import dilated_attention
from dilated.kernels.engines import (
    SubproblemSpec,
    available_engines,
    choose_engine,
    flash4,
    sdpa_flash,
)
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ENGINES_HERE = available_engines("cuda") if torch.cuda.is_available() else []
needs_flash4 = pytest.mark.skipif(
    not (torch.cuda.is_available() and flash4.available(torch.device("cuda"))),
    reason="flash-attn-4 is not installed for this GPU",
)


def _float64_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge: dilated-core's dense attention in float64 (GQA, top-left causal)."""
    return dense_segment_attention(q.double(), k.double(), v.double(), None, scale, causal, 0.0)


def _strided(b: int, rows: int, heads: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """Rows 1, 4, 7, ... of every second head of a (b, 3 rows, 2 heads, d) tensor."""
    x = torch.randn(b, 3 * rows, 2 * heads, d, generator=gen, device="cuda", dtype=dtype)
    return x[:, 1::3, ::2]


@pytest.mark.parametrize("engine", ENGINES_HERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_engine_matches_float64(
    engine: str, dtype: torch.dtype, head_dim: int, causal: bool, kv_heads: int
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(head_dim + kv_heads + causal)
    q = _strided(2, 300, 8, head_dim, dtype, gen)
    k, v = (_strided(2, 300, kv_heads, head_dim, dtype, gen) for _ in range(2))
    spec = SubproblemSpec.of(q, k, is_causal=causal, key_mask=None, dropout_p=0.0)
    assert engine == choose_engine(spec, q, k, v, engine).NAME  # it runs there, no fallback
    out, lse = subproblem_attention(q, k, v, scale=0.1, is_causal=causal, engine=engine)
    want, want_lse = _float64_attention(q, k, v, 0.1, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_reference(out, want, dtype)
    assert_close_to_reference(lse, want_lse, dtype, "lse")
    # The backward from the merged output: here the call is the whole softmax.
    g = torch.randn(q.shape, generator=gen, device="cuda", dtype=dtype)
    grads = subproblem_attention_backward(
        g, q, k, v, out, lse, scale=0.1, is_causal=causal, engine=engine
    )
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = _float64_attention(*leaves, 0.1, causal)
    want_grads = torch.autograd.grad(ref, leaves, g.double())
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads):
        assert got.shape == expected.shape
        assert_close_to_reference(got, expected, dtype, name)


@needs_flash4
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash4_backward_runs_only_where_it_matches(head_dim: int, kv_heads: int) -> None:
    """Asked for ``"flash4"``, the backward runs there only at the head sizes it computes
    correctly (on SM90 its dQ is wrong at head_dim 16, 48, 80); the others go to an engine
    that is."""
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(head_dim + kv_heads)
    q = _strided(1, 333, 4, head_dim, dtype, gen)
    k, v = (_strided(1, 333, kv_heads, head_dim, dtype, gen) for _ in range(2))
    spec = SubproblemSpec.of(q, k, is_causal=False, key_mask=None, dropout_p=0.0, backward=True)
    chosen = choose_engine(spec, q, k, v, "flash4").NAME
    if torch.cuda.get_device_capability()[0] == 9:
        assert (chosen == "flash4") == (head_dim % flash4.SM90_BACKWARD_HEAD_DIM_MULTIPLE == 0)
    out, lse = _float64_attention(q, k, v, 0.2, False)
    g = torch.randn(q.shape, generator=gen, device="cuda", dtype=dtype)
    grads = subproblem_attention_backward(
        g, q, k, v, out.to(dtype), lse.float(), scale=0.2, is_causal=False, engine="flash4"
    )
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = _float64_attention(*leaves, 0.2, False)
    for name, got, expected in zip(
        ("dq", "dk", "dv"), grads, torch.autograd.grad(ref, leaves, g.double())
    ):
        assert_close_to_reference(got, expected, dtype, f"{name} on {chosen}")


@pytest.mark.parametrize("engine", ENGINES_HERE)
def test_engine_parts_merge_into_one_softmax(engine: str) -> None:
    """Two halves of the keys on the engine, merged by LSE, equal attention over all keys; each
    half's backward from the MERGED output and LSE adds up to the whole gradient."""
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 256, 4, 64, generator=gen, device="cuda", dtype=dtype) for _ in "qkv")
    halves = [(k[:, :128], v[:, :128]), (k[:, 128:], v[:, 128:])]
    acc = torch.zeros(1, 256, 4, 64, device="cuda")
    acc_lse = torch.full((1, 4, 256), -torch.inf, device="cuda")
    for kh, vh in halves:
        merge_into_reference(
            acc, acc_lse, *subproblem_attention(q, kh, vh, scale=0.125, engine=engine)
        )
    want, want_lse = _float64_attention(q, k, v, 0.125, False)
    assert_close_to_reference(acc, want, dtype)
    assert_close_to_reference(acc_lse, want_lse, dtype, "lse")
    g = torch.randn(q.shape, generator=gen, device="cuda", dtype=dtype)
    out = acc.to(dtype)
    parts = [
        subproblem_attention_backward(g, q, kh, vh, out, acc_lse, scale=0.125, engine=engine)
        for kh, vh in halves
    ]
    dq = parts[0][0].double() + parts[1][0].double()
    dk = torch.cat([parts[0][1], parts[1][1]], dim=1)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = _float64_attention(*leaves, 0.125, False)
    want_dq, want_dk, _ = torch.autograd.grad(ref, leaves, g.double())
    assert_close_to_reference(dq, want_dq, dtype, "dq")
    assert_close_to_reference(dk, want_dk, dtype, "dk")


@needs_flash4
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize(("batch", "seq"), [(2, 1000), (1, 2048)])
def test_flash_backend_matches_dense(causal: bool, kv_heads: int, batch: int, seq: int) -> None:
    attention = functools.partial(dilated_attention, return_lse=True, backend="flash")
    check_on_random_inputs(
        attention, batch, seq, 4, 128, (128, 256, 512), (1, 2, 4), kv_heads=kv_heads,
        is_causal=causal, dtype=torch.bfloat16, device="cuda", seed=seq + kv_heads,
    )  # fmt: skip


@needs_flash4
def test_flash_backend_refuses_a_key_mask_naming_the_reason() -> None:
    x = make_inputs(1, 256, 4, 64, padding=True, dtype=torch.bfloat16, device="cuda", seed=1)
    with pytest.raises(ValueError, match=r"backend='flash'.*no arbitrary key mask"):
        dilated_attention(
            x.q, x.k, x.v, [64], [1], key_padding_mask=x.key_padding_mask, backend="flash"
        )


@needs_flash4
def test_auto_prefers_flash4_where_it_runs() -> None:
    """Above ``SMALL_CALL_WORK``; below it the call goes to PyTorch's flash kernels."""
    one = torch.empty(1, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
    large, small = one.expand(1, 16384, 8, 128), one.expand(1, 512, 8, 128)
    # flash-attn-4 has a backward from SM90 on.
    passes = [False, True] if torch.cuda.get_device_capability()[0] >= 9 else [False]
    for backward in passes:
        spec = SubproblemSpec.of(
            large, large, is_causal=True, key_mask=None, dropout_p=0.0, backward=backward
        )
        assert choose_engine(spec, large, large, large) is flash4
        if sdpa_flash.available(torch.device("cuda")):
            assert choose_engine(spec, small, small, small) is sdpa_flash


@needs_flash4
def test_flash_backend_compiles_with_fullgraph() -> None:
    x = make_inputs(1, 1024, 4, 64, requires_grad=True, dtype=torch.bfloat16, device="cuda", seed=3)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(q, k, v, [256, 512], [1, 2], is_causal=True, backend="flash")

    eager = attend(x.q, x.k, x.v)
    compiled = torch.compile(attend, fullgraph=True)(x.q, x.k, x.v)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(eager)
    for a, e in zip(
        torch.autograd.grad(compiled, (x.q, x.k, x.v), g),
        torch.autograd.grad(eager, (x.q, x.k, x.v), g),
    ):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
