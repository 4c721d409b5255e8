"""The shared sub-problem primitive: dense attention of a strided view, and its backward.

Every dilated computation in the project is a set of dense attention problems over strided
views of ``(batch, seq, heads, head_dim)`` tensors (one per branch, phase and run of segments),
merged by their log-sum-exp. This module computes one batch of such problems, returning the
float32 LSE, and the gradient of one of them given the FINAL merged output and LSE of its rows.
The ``"cudnn"`` backend, the ring and all-gather strategies of dilated-ring, the LongNet KV cache
and dilated-sparse all call it.

Engines: cuDNN's fused attention (through PyTorch's ``_scaled_dot_product_cudnn_attention``),
which reads strided views in place at full speed and returns the LSE, for CUDA float16/bfloat16
inputs with ``head_dim`` a multiple of 8 up to 128, no key mask and no dropout; otherwise the
portable plain-PyTorch fallback of dilated-core
([`dense_segment_attention`][dilated.core.reference.dense_segment_attention]), computed in
float32, which materialises the score matrix of the call.
"""

from __future__ import annotations

import torch

from dilated.core.reference import (
    compute_dtype,
    dense_segment_attention,
    dense_segment_attention_backward,
)

__all__ = [
    "cudnn_supports",
    "has_cudnn_attention",
    "subproblem_attention",
    "subproblem_attention_backward",
]


def has_cudnn_attention() -> bool:
    """Whether this PyTorch build has cuDNN's fused attention op."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")


def cudnn_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> bool:
    """Whether [`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] runs
    this call on cuDNN (else on the plain-PyTorch fallback)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
        and key_mask is None
        and dropout_p == 0.0
        and q.shape[1] > 0
        and k.shape[1] > 0
        # cuDNN's causal mask with unequal lengths is not top-left aligned everywhere.
        and (not is_causal or q.shape[1] == k.shape[1])
        and has_cudnn_attention()
        and torch.backends.cudnn.is_available()
    )


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat key/value heads ``(B, L, H_kv, D)`` for the query heads that read them."""
    group = heads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _fold_heads(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum the gradients of repeated key/value heads back into ``(B, L, H_kv, D)``."""
    b, n, h, d = dx.shape
    if h == kv_heads:
        return dx
    return dx.reshape(b, n, kv_heads, h // kv_heads, d).sum(3)


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

    Returns:
        ``(out, lse)``: ``out`` ``(batch, rows_q, heads, head_dim)`` in the dtype of ``q`` (0 for
        a row with no allowed key); ``lse`` ``(batch, heads, rows_q)`` float32 (float64 for
        float64 inputs; ``-inf`` there), taken before dropout so that partial results merge into
        one softmax.
    """
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_seed is required with dropout_p > 0: the backward replays it")
    heads = q.shape[2]
    if cudnn_supports(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p):
        qt, kt, vt = (
            x.transpose(1, 2) for x in (q, _expand_heads(k, heads), _expand_heads(v, heads))
        )
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, is_causal, False, scale=scale
        )
        return res[0].transpose(1, 2), res[1].reshape(qt.shape[:-1])
    work = compute_dtype(q.dtype)
    out, lse = dense_segment_attention(
        q.to(work),
        k.to(work),
        v.to(work),
        key_mask,
        scale,
        is_causal,
        dropout_p,
        dropout_seed,
    )
    return out.to(q.dtype), lse.to(work)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This sub-problem's share of the gradients, given the FINAL merged output and LSE.

    Parts merged by log-sum-exp (branches, ring steps, sparse blocks) form one softmax over the
    union of their keys, so each part's gradient is the ordinary attention backward evaluated
    with the merged ``O`` and ``L`` (``P = exp(S - L)``, ``dS = P (dP - rowsum(dO O))``); the
    parts' shares add up to the gradient of the whole.

    Args:
        grad_out: gradient of the final output rows, ``(batch, rows_q, heads, head_dim)``.
        q, k, v, scale, is_causal, key_mask, dropout_p, dropout_seed: as in the forward call
            ([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]).
        out: the final merged output of these rows, ``(batch, rows_q, heads, head_dim)``.
        lse: the final merged LSE ``(batch, heads, rows_q)`` (``-inf`` for uncovered rows).

    Returns:
        ``(dq, dk, dv)``: ``dq`` ``(batch, rows_q, heads, head_dim)``, ``dk``/``dv``
        ``(batch, rows_k, kv_heads, head_dim)`` (grouped query heads summed into their key/value
        head), in the dtypes of ``q``, ``k``, ``v``.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if cudnn_supports(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p):
        qt, kt, vt = (
            x.transpose(1, 2) for x in (q, _expand_heads(k, heads), _expand_heads(v, heads))
        )
        # No dropout: the philox seed/offset are never read; no bias, no ragged lengths.
        unused = q.new_empty(0, dtype=torch.int64)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2),
            lse.float().contiguous().unsqueeze(-1), unused, unused, None, None, None,
            qt.shape[2], kt.shape[2], 0.0, is_causal, scale=scale,
        )  # fmt: skip
        dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])
        return dq, _fold_heads(dk, kv_heads), _fold_heads(dv, kv_heads)
    work = compute_dtype(q.dtype)
    dq, dk, dv = dense_segment_attention_backward(
        grad_out.to(work),
        q.to(work),
        k.to(work),
        v.to(work),
        out.to(work),
        lse,
        key_mask,
        scale,
        is_causal,
        dropout_p,
        dropout_seed,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
