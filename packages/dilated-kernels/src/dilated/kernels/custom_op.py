"""The autograd of the project's attention custom ops, registered once for all of them.

An attention op ``(q, k, v, key_mask, seed, *options) -> (out, lse)`` (dilated-kernels'
``dilated_kernels::cudnn_attention``, dilated-sparse's ``dilated_sparse::attention``) has a
backward op ``(d_out, [d_lse,] q, k, v, key_mask, out, lse, seed, *options) -> (dq, dk, dv)``;
[`register_attention_autograd`][dilated.kernels.custom_op.register_attention_autograd] connects
the two, so that ``torch.compile`` and CUDA graphs see one opaque forward and one opaque
backward.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["register_attention_autograd"]


def register_attention_autograd(forward_op: Any, backward_op: Any, *, lse_grad: bool) -> None:
    """Register the autograd of ``forward_op`` (a ``torch.library.custom_op``) as ``backward_op``.

    Args:
        forward_op: ``(q, k, v, key_mask, seed, *options) -> (out, lse)``.
        backward_op: ``(d_out, [d_lse,] q, k, v, key_mask, out, lse, seed, *options)`` ->
            ``(dq, dk, dv)``; it takes the LSE's gradient (None when the LSE is unused) when
            ``lse_grad``.
        lse_grad: the returned LSE is differentiable; otherwise it is marked non-differentiable.
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

    def backward(
        ctx: Any, d_out: torch.Tensor | None, d_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, key_mask, out, lse, seed = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        lse_args = (d_lse,) if lse_grad else ()
        grads = backward_op(d_out, *lse_args, q, k, v, key_mask, out, lse, seed, *ctx.opts)
        return (*grads, None, None, *([None] * len(ctx.opts)))

    forward_op.register_autograd(backward, setup_context=setup_context)
