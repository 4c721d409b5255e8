"""The shared sub-problem primitive: dense attention of a strided view, and its backward.

Every dilated computation in the project is a set of dense attention problems over strided
views of ``(batch, seq, heads, head_dim)`` tensors (one per branch, phase and run of segments),
merged by their log-sum-exp. This module computes one batch of such problems, returning the
float32 LSE, and the gradient of one of them given the FINAL merged output and LSE of its rows.
The ``"cudnn"`` and ``"flash"`` backends, the ring and all-gather strategies of dilated-ring,
the LongNet KV cache and dilated-sparse all call it.

Each call runs on one of the dense engines of [`dilated.kernels.engines`][dilated.kernels.engines]
(flash-attn-4, cuDNN, PyTorch's flash kernels, or the plain-PyTorch reference), chosen per call
by [`choose_engine`][dilated.kernels.engines.choose_engine] unless ``engine=`` names one.
"""

from __future__ import annotations

import torch

from dilated.kernels._capabilities import has_cudnn_attention
from dilated.kernels.engines import SubproblemSpec, choose_engine
from dilated.kernels.engines import cudnn as cudnn_engine

__all__ = [
    "CUDNN_MASK_DROPOUT_HEAD_DIMS",
    "cudnn_supports",
    "has_cudnn_attention",
    "subproblem_attention",
    "subproblem_attention_backward",
]

#: head_dim values with which cuDNN's bias (key mask) and dropout were verified on an H200.
CUDNN_MASK_DROPOUT_HEAD_DIMS = cudnn_engine.MASK_DROPOUT_HEAD_DIMS


def cudnn_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> bool:
    """Whether the ``"cudnn"`` engine can run this call (see
    [`dilated.kernels.engines.cudnn`][dilated.kernels.engines.cudnn])."""
    spec = SubproblemSpec.of(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p)
    return cudnn_engine.unsupported_reason(spec) is None


def _check(q: torch.Tensor, k: torch.Tensor, dropout_p: float, dropout_seed: int | None) -> None:
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_seed is required with dropout_p > 0: the backward replays it")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share head_dim (the last dimension), got {q.shape[-1]} and {k.shape[-1]}"
        )


def subproblem_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of a batch of sub-problems, with its float32 log-sum-exp.

    Args:
        q: ``(batch, rows_q, heads, head_dim)``, any strides with a unit stride on
            ``head_dim`` (a strided view of a ``(batch, seq, heads, head_dim)`` input is read in
            place).
        k: ``(batch, rows_k, kv_heads, head_dim)``, ``heads % kv_heads == 0``: query head ``j``
            reads key/value head ``j // (heads / kv_heads)``.
        v: shaped like ``k``.
        scale: softmax scale.
        is_causal: top-left aligned: query row ``i`` sees key rows ``j <= i``.
        key_mask: bool ``(batch, rows_k)``, True = key allowed, or None.
        dropout_p: dropout on the attention probabilities.
        dropout_seed: with ``dropout_p > 0``, the seed the dropout mask is drawn from (required:
            the backward pass draws the same mask from it).
        engine: ``"auto"`` or an engine's name (``ENGINE_NAMES`` of
            [`dilated.kernels.engines`][dilated.kernels.engines]); see
            [`choose_engine`][dilated.kernels.engines.choose_engine].

    Returns:
        ``(out, lse)``: ``out`` ``(batch, rows_q, heads, head_dim)`` in the dtype of ``q`` (0 for
        a row with no allowed key); ``lse`` ``(batch, heads, rows_q)`` float32 (float64 for
        float64 inputs; ``-inf`` there), taken before dropout so that partial results merge into
        one softmax.
    """
    _check(q, k, dropout_p, dropout_seed)
    spec = SubproblemSpec.of(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p)
    impl = choose_engine(spec, q, k, v, engine)
    return impl.forward(
        q, k, v, scale=scale, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )  # fmt: skip


def subproblem_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This sub-problem's share of the gradients, given the FINAL merged output and LSE.

    Parts merged by log-sum-exp (branches, ring steps, sparse blocks) form one softmax over the
    union of their keys, so each part's gradient is the ordinary attention backward evaluated
    with the merged ``O`` and ``L`` (``P = exp(S - L)``, ``dS = P (dP - rowsum(dO O))``); the
    parts' shares add up to the gradient of the whole. Any engine computes it, whichever ran the
    forward, except with dropout, whose mask only the forward's engine replays (both passes
    choose the same one: dropout runs on ``"cudnn"`` or ``"reference"`` only).

    Args:
        grad_out: gradient of the final output rows, ``(batch, rows_q, heads, head_dim)``.
        q, k, v, scale, is_causal, key_mask, dropout_p, dropout_seed, engine: as in the
            forward call
            ([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]).
        out: the final merged output of these rows, ``(batch, rows_q, heads, head_dim)``.
        lse: the final merged LSE ``(batch, heads, rows_q)`` (``-inf`` for uncovered rows).

    Returns:
        ``(dq, dk, dv)``: ``dq`` ``(batch, rows_q, heads, head_dim)``, ``dk``/``dv``
        ``(batch, rows_k, kv_heads, head_dim)`` (grouped query heads summed into their key/value
        head), in the dtypes of ``q``, ``k``, ``v``.
    """
    _check(q, k, dropout_p, dropout_seed)
    spec = SubproblemSpec.of(
        q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p, backward=True
    )
    impl = choose_engine(spec, q, k, v, engine)
    return impl.backward(
        grad_out, q, k, v, out, lse, scale=scale, is_causal=is_causal, key_mask=key_mask,
        dropout_p=dropout_p, dropout_seed=dropout_seed,
    )  # fmt: skip
