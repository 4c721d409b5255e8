"""The reference implementation of dilated attention in plain PyTorch.

Every branch ``(w, r)`` and phase ``p`` is a set of independent dense problems: the rows
``t = p, p + r, ...`` of the heads ``j = p, p + r, ...``, cut into segments of ``w / r`` rows.
Those rows are a strided view of the ``(batch, seq, heads, head_dim)`` input (stride ``r`` over
seq and over heads), so no ``seq x seq`` mask is built and memory grows linearly with ``seq``.
The loop over branches and phases is :func:`dilated.core.branches.run_branches`; this module supplies
its dense kernel, which also yields the log-sum-exp. Inputs are assumed valid:
:mod:`dilated.core.functional` checks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dilated.core.branches import compute_dtype, phase_heads, run_branches

__all__ = [
    "attention_with_lse",
    "compute_dtype",
    "dense_segment_attention",
    "dilated_attention_reference",
    "phase_heads",
]


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over the last two dims that also returns the log-sum-exp.

    Args:
        q: ``(..., L, d)`` (computed in its own dtype).
        k: ``(..., L_k, d)`` with the leading dims of ``q``.
        v: shaped like ``k``.
        scale: softmax scale.
        is_causal: key ``u`` is allowed for query ``t`` only when ``u <= t`` (same index space).
        key_mask: bool, broadcastable to ``(..., L)`` over keys; True = allowed.
        dropout_p: dropout on the attention probabilities (0 disables it).

    Returns:
        ``(out, lse)``: ``out`` ``(..., L, d)``, zero for a query with no allowed key, and ``lse``
        ``(..., L)``, ``-inf`` there. Gradients stay finite in both cases.
    """
    if k.shape[-2] == 0:
        # No key at all: the empty-set convention, kept differentiable (zero gradients).
        out = torch.matmul(q, k.transpose(-1, -2)) @ v
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed: torch.Tensor | None = None
    if is_causal:
        n_q, n_k = scores.shape[-2], scores.shape[-1]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
    if key_mask is not None:
        km = key_mask.unsqueeze(-2)
        allowed = km if allowed is None else allowed & km
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    probs = weights / safe_total
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)
    lse = torch.log(safe_total) + row_max
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    return out, lse.squeeze(-1)


def dense_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`~dilated.core.branches.DenseAttention` in plain PyTorch.

    Inputs ``(B, L, H, D)`` and ``key_mask`` ``(B, L)``; returns ``out`` ``(B, L, H, D)`` and
    ``lse`` ``(B, H, L)``.
    """
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    km = None if key_mask is None else key_mask[:, None, :]
    out, lse = attention_with_lse(
        qt, kt, vt, scale, is_causal=is_causal, key_mask=km, dropout_p=dropout_p
    )
    return out.transpose(1, 2), lse


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of SPEC.md on validated inputs.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, kv_heads, head_dim)``.
        v: shaped like ``k``.
        segment_lengths: ``w_i`` of each branch (already validated).
        dilation_rates: ``r_i`` of each branch (already validated).
        scale: softmax scale.
        is_causal: as in :func:`dilated.core.dilated_attention`.
        key_padding_mask: as in :func:`dilated.core.dilated_attention`.
        dropout_p: as in :func:`dilated.core.dilated_attention`.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` in its dtype; ``lse`` ``(batch, heads, seq)`` in float32
        (float64 for float64 inputs).
    """
    return run_branches(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        dense=dense_segment_attention,
        work_dtype=compute_dtype(q.dtype),
    )
