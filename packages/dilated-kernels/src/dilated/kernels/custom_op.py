"""The project's attention custom ops: defined, faked and given their autograd in one place.

An attention op ``(q, k, v, key_mask, seed, *options) -> (out, lse)`` (dilated-kernels'
``dilated_kernels::cudnn_attention``, dilated-sparse's ``dilated_sparse::attention``) has a
backward op ``(d_out, [d_lse,] q, k, v, key_mask, out, lse, seed, *options) -> (dq, dk, dv)``;
[`register_attention_autograd`][dilated.kernels.custom_op.register_attention_autograd] connects
the two, so that ``torch.compile`` and CUDA graphs see one opaque forward and one opaque
backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["define_attention_op", "register_attention_autograd"]

Attention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def register_attention_autograd(
    forward_op: Any,
    backward_op: Any,
    *,
    lse_grad: bool,
    forward_impl: Attention,
    backward_impl: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> Attention:
    """Register the autograd of ``forward_op`` (a ``torch.library.custom_op``) as ``backward_op``,
    and return the function that callers use.

    The returned function runs the custom op under ``torch.compile`` (one opaque node for
    Dynamo and CUDA graphs), and in eager mode an ``autograd.Function`` over the ops' own
    implementations with the same context and backward: the dispatcher's schema parsing,
    default filling and aliasing checks cost about 35 us per forward and 70 us per
    forward+backward (a CPU measurement, 2026-12-05), which a short call cannot hide.

    Args:
        forward_op: ``(q, k, v, key_mask, seed, *options) -> (out, lse)``.
        backward_op: ``(d_out, [d_lse,] q, k, v, key_mask, out, lse, seed, *options)`` ->
            ``(dq, dk, dv)``; it takes the LSE's gradient (None when the LSE is unused) when
            ``lse_grad``.
        lse_grad: the returned LSE is differentiable; otherwise it is marked non-differentiable.
        forward_impl, backward_impl: the functions the two custom ops were made from.

    Returns:
        ``attend(q, k, v, key_mask, seed, *options) -> (out, lse)``.
    """

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        q, k, v, key_mask, seed, *opts = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_mask, out, lse, seed)
        ctx.opts = opts
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        # An unused output's gradient stays None, not zeros: a zero LSE gradient would send
        # the cudnn backward to its Triton path.
        ctx.set_materialize_grads(False)

    def backward_with(
        run: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> Callable[..., tuple[torch.Tensor | None, ...]]:
        def backward(
            ctx: Any, d_out: torch.Tensor | None, d_lse: torch.Tensor | None
        ) -> tuple[torch.Tensor | None, ...]:
            q, k, v, key_mask, out, lse, seed = ctx.saved_tensors
            if d_out is None:
                d_out = torch.zeros_like(out)
            lse_args = (d_lse,) if lse_grad else ()
            grads = run(d_out, *lse_args, q, k, v, key_mask, out, lse, seed, *ctx.opts)
            return (*grads, None, None, *([None] * len(ctx.opts)))

        return backward

    forward_op.register_autograd(backward_with(backward_op), setup_context=setup_context)

    eager_backward = backward_with(backward_impl)

    # The form with ``ctx`` in ``forward`` (not a separate ``setup_context``): ``apply`` then
    # skips binding the arguments to a signature, about 20 us per call.
    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            output = forward_impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        @once_differentiable  # type: ignore[misc]
        def backward(ctx: Any, *grads: Any) -> Any:
            return eager_backward(ctx, *grads)

    def attend(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            out, lse = forward_op(*args)
        else:
            out, lse = Eager.apply(*args)
        return out, lse

    return attend


def define_attention_op(
    name: str,
    options: str,
    forward_impl: Attention,
    backward_impl: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    lse_grad: bool,
    lse_dtype: Callable[[torch.dtype], torch.dtype],
) -> Attention:
    """Define the custom ops ``name`` and ``name + "_backward"`` from two functions, with their
    fake implementations and autograd, and return the function callers use (see
    [`register_attention_autograd`][dilated.kernels.custom_op.register_attention_autograd]).

    Args:
        name: ``"namespace::op"``.
        options: the schema of the arguments after ``seed`` (``"int[] segment_lengths, ..."``).
        forward_impl: ``(q, k, v, key_mask, seed, *options) -> (out, lse)``, ``out`` shaped
            like ``q`` ``(batch, seq, heads, head_dim)``, ``lse`` ``(batch, heads, seq)``.
        backward_impl: ``(d_out, [d_lse,] q, k, v, key_mask, out, lse, seed, *options) ->
            (dq, dk, dv)`` shaped like ``q``, ``k``, ``v``.
        lse_grad: the LSE is differentiable (``backward_impl`` takes ``d_lse``).
        lse_dtype: the LSE's dtype for a ``q`` dtype (for the fake implementation).
    """
    forward_op = torch.library.custom_op(
        name,
        mutates_args=(),
        schema=f"(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? seed, {options}) "
        "-> (Tensor, Tensor)",
    )(forward_impl)

    @forward_op.register_fake
    def _forward_fake(q: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, h, _ = q.shape
        return torch.empty_like(q), q.new_empty((b, h, n), dtype=lse_dtype(q.dtype))

    d_lse = "Tensor? d_lse, " if lse_grad else ""
    backward_op = torch.library.custom_op(
        f"{name}_backward",
        mutates_args=(),
        schema=f"(Tensor d_out, {d_lse}Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
        f"Tensor out, Tensor lse, Tensor? seed, {options}) -> (Tensor, Tensor, Tensor)",
    )(backward_impl)

    @backward_op.register_fake
    def _backward_fake(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = args[2:5] if lse_grad else args[1:4]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    return register_attention_autograd(
        forward_op,
        backward_op,
        lse_grad=lse_grad,
        forward_impl=forward_impl,
        backward_impl=backward_impl,
    )
