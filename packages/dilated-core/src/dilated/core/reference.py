"""The reference implementation of dilated attention in plain PyTorch.

Every branch ``(w, r)`` and phase ``p`` is a set of independent dense problems: the rows
``t = p, p + r, ...`` of the heads ``j = p, p + r, ...``, cut into segments of ``w / r`` rows.
Those rows are a strided view of the ``(batch, seq, heads, head_dim)`` input (stride ``r`` over
seq and over heads), so no ``seq x seq`` mask is built and memory grows linearly with ``seq``.
Each sub-problem yields its output and log-sum-exp, and :func:`~dilated.core.merge.merge_attention`
combines the branches. Inputs are assumed valid: :mod:`dilated.core.functional` checks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dilated.core.merge import merge_attention

__all__ = ["attention_with_lse", "compute_dtype", "dilated_attention_reference", "phase_heads"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def phase_heads(heads_q: int, heads_kv: int, rate: int, phase: int) -> tuple[slice, torch.Tensor]:
    """Query heads of one phase (``j mod rate == phase``) and the key/value head each one reads.

    Returns a slice over query heads and a long tensor of key/value head indices (``j // group``).
    """
    group = heads_q // heads_kv
    return slice(phase, heads_q, rate), torch.arange(phase, heads_q, rate) // group


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


def _segments_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside each of ``S`` segments: inputs ``(b, S, L, h, d)``, key_mask ``(b, S, L)``.

    Returns ``out`` ``(b, S * L, h, d)`` and ``lse`` ``(b, h, S * L)``.
    """
    b, s, length, h, d = q.shape
    qt, kt, vt = (x.permute(0, 1, 3, 2, 4) for x in (q, k, v))  # (b, S, h, L, d)
    km = None if key_mask is None else key_mask[:, :, None, :]  # (b, S, 1, L)
    out, lse = attention_with_lse(
        qt, kt, vt, scale, is_causal=is_causal, key_mask=km, dropout_p=dropout_p
    )
    out = out.permute(0, 1, 3, 2, 4).reshape(b, s * length, h, d)
    lse = lse.permute(0, 2, 1, 3).reshape(b, h, s * length)
    return out, lse


def _branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: int,
    r: int,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(b, n, hq, d)`` and lse ``(b, hq, n)`` of one branch (inputs in compute dtype)."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    out = q.new_zeros(b, n, hq, d)
    lse = torch.full((b, hq, n), float("-inf"), dtype=q.dtype, device=q.device)
    full_segments = n // w
    rows_per_segment = w // r
    for p in range(min(r, hq)):
        if p >= n:
            break
        heads, kv_heads = phase_heads(hq, hkv, r, p)
        qp = q[:, p::r, heads]
        if hkv == hq:
            kp, vp = k[:, p::r, heads], v[:, p::r, heads]
        else:
            kv_idx = kv_heads.to(q.device)
            kp = k[:, p::r].index_select(2, kv_idx)
            vp = v[:, p::r].index_select(2, kv_idx)
        mp = None if key_padding_mask is None else key_padding_mask[:, p::r]
        rows = qp.shape[1]
        full_rows = full_segments * rows_per_segment
        outs, lses = [], []
        # Full segments are one batched problem; the shorter last segment (when seq is not a
        # multiple of w) is a second one, so no padding token ever enters a softmax.
        for start, stop, count, length in (
            (0, full_rows, full_segments, rows_per_segment),
            (full_rows, rows, 1, rows - full_rows),
        ):
            if count == 0 or length == 0:
                continue

            def cut(
                x: torch.Tensor,
                start: int = start,
                stop: int = stop,
                count: int = count,
                length: int = length,
            ) -> torch.Tensor:
                return x[:, start:stop].reshape(b, count, length, *x.shape[2:])

            o_part, lse_part = _segments_attention(
                cut(qp),
                cut(kp),
                cut(vp),
                None if mp is None else cut(mp),
                scale,
                is_causal,
                dropout_p,
            )
            outs.append(o_part)
            lses.append(lse_part)
        out[:, p::r, heads] = torch.cat(outs, dim=1)
        lse[:, heads, p::r] = torch.cat(lses, dim=2)
    return out, lse


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
    dtype = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        o, lse = _branch(qc, kc, vc, w, r, scale, is_causal, key_padding_mask, dropout_p)
        outs.append(o)
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    return out.to(q.dtype), lse
