"""Gradients computed outside autograd, made to refuse a second derivative.

A backward pass built from fused kernels returns tensors without history;
[`first_derivative_only`][dilated.core.gradients.first_derivative_only] makes a second
derivative through them raise instead of silently leaving their term out.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["first_derivative_only"]


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on gradients whose backward raises: what a second derivative reaches."""

    @staticmethod
    def forward(message: str, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise RuntimeError(ctx.message)


def first_derivative_only(
    op: str, instead: str, grads: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor | None, ...]:
    """The gradients that a backward pass computed without autograd, made to refuse a second
    derivative.

    A backward built from fused kernels returns tensors without history: under
    ``create_graph=True`` (a gradient penalty, a Hessian-vector product) they would be taken
    as constants, and the second derivative would silently leave their term out. Called at the
    end of such a backward, this returns the gradients unchanged when the graph of the backward
    is not recorded (the usual ``backward()``), and otherwise aliases of them whose own backward
    raises ``RuntimeError`` naming ``op`` and ``instead``, as the project's custom ops do.

    Args:
        op: what computed them, e.g. ``"backend='triton'"``.
        instead: what to use for second derivatives, e.g. ``"backend='reference' or 'sdpa'"``.
        grads: the backward's results (None for inputs without a gradient).

    Returns:
        ``grads``, or their refusing aliases under ``create_graph=True``.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    if not torch.is_grad_enabled() or not present:
        return grads
    message = (
        f"{op} computes first derivatives only: its gradients cannot be differentiated again "
        f"(create_graph=True, e.g. a gradient penalty or a Hessian-vector product); use "
        f"{instead} for second derivatives"
    )
    # Detached leaves that require grad: the aliases then get the refusing backward as their
    # grad_fn (the gradients themselves have no history to attach it to).
    leaves = [grads[i].detach().requires_grad_() for i in present]  # type: ignore[union-attr]
    aliases = _NoSecondDerivative.apply(message, *leaves)
    out = list(grads)
    for i, alias in zip(present, aliases):
        out[i] = alias
    return tuple(out)
