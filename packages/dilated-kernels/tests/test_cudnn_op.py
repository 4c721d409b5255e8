"""The ``"cudnn"`` backend as a ``torch.library`` custom op: ``opcheck`` and ``torch.compile``.

On CPU the op runs its planning and Triton kernels under ``TRITON_INTERPRET=1`` (the cuDNN calls
replaced by the same math), which is what ``opcheck`` and the compiler see here; the GPU tests
compile and capture it on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from dilated.core.testing import make_inputs
from dilated.kernels import dilated_attention
from dilated.kernels.backends import cudnn

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA present: the cuDNN op is tested in test_gpu.py"
    ),
    pytest.mark.usefixtures("interpret"),
]

_OP = torch.ops.dilated_kernels.cudnn_attention.default


@pytest.mark.parametrize(("kv_heads", "padding", "causal"), [(4, False, True), (2, True, False)])
def test_opcheck(kv_heads: int, padding: bool, causal: bool) -> None:
    x = make_inputs(1, 24, 4, 16, kv_heads=kv_heads, padding=padding, requires_grad=True, seed=1)
    args = (x.q, x.k, x.v, x.key_padding_mask, None, [4, 8], [1, 2], 0.25, causal, 0.0)
    torch.library.opcheck(_OP, args)


def test_opcheck_with_dropout() -> None:
    # Without the dynamic-shape AOT test: it differentiates the LSE too, which dropout refuses.
    x = make_inputs(1, 16, 4, 16, kv_heads=2, requires_grad=True, seed=2)
    args = (x.q, x.k, x.v, None, torch.tensor([7]), [4, 8], [1, 2], 0.25, True, 0.3)
    torch.library.opcheck(
        _OP, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def test_compiles_with_fullgraph() -> None:
    x = make_inputs(2, 20, 4, 16, kv_heads=2, padding=True, requires_grad=True, seed=3)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(
            q, k, v, [4, 8], [1, 2], is_causal=True, key_padding_mask=x.key_padding_mask,
            backend="cudnn",
        )  # fmt: skip

    eager = attend(x.q, x.k, x.v)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")(x.q, x.k, x.v)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (x.q, x.k, x.v), g)
    got = torch.autograd.grad(compiled, (x.q, x.k, x.v), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_lse_gradient_with_dropout_is_refused() -> None:
    x = make_inputs(1, 16, 2, 16, requires_grad=True, seed=4)
    _, lse = dilated_attention(
        x.q, x.k, x.v, [4], [1], dropout_p=0.2, return_lse=True, backend="cudnn"
    )
    with pytest.raises(ValueError, match="gradient on the returned LSE with dropout"):
        lse.sum().backward()


def test_unused_lse_keeps_the_cudnn_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # Zeros for the unused LSE's gradient would send every backward to the slower Triton path.
    from dilated.kernels.backends import triton as triton_backend

    def refuse(*args: object) -> None:
        raise AssertionError("the Triton backward ran")

    monkeypatch.setattr(triton_backend, "backward", refuse)
    x = make_inputs(1, 16, 2, 16, requires_grad=True, seed=4)
    out, _ = dilated_attention(x.q, x.k, x.v, [4], [1], return_lse=True, backend="cudnn")
    out.sum().backward()
    assert x.q.grad is not None


@pytest.mark.parametrize(("kv_heads", "padding", "causal"), [(4, False, True), (2, True, False)])
def test_eager_calls_skip_the_dispatcher_and_equal_the_op(
    kv_heads: int, padding: bool, causal: bool
) -> None:
    """Eager calls run an ``autograd.Function`` over the op's own functions (no dispatcher on a
    short call's host path); out, LSE and the gradients through both equal the custom op's."""
    x = make_inputs(1, 24, 4, 16, kv_heads=kv_heads, padding=padding, requires_grad=True, seed=5)
    mask = None if x.key_padding_mask is None else ~x.key_padding_mask
    args = (x.q, x.k, x.v, mask, None, [4, 8], [1, 2], 0.25, causal, 0.0, "auto", [])
    out, lse = cudnn._attend(*args)
    assert type(out.grad_fn).__name__ == "EagerBackward"
    want_out, want_lse = _OP(*args)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (x.q, x.k, x.v), (g, g_lse))
    want = torch.autograd.grad((want_out, want_lse), (x.q, x.k, x.v), (g, g_lse))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    # Its backward is not differentiable (nor is the op's): a second derivative is refused.
    out, _ = cudnn._attend(*args)
    (dq,) = torch.autograd.grad(out.sum(), (x.q,), create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(dq.sum(), (x.q,))
