"""The per-branch, per-phase loop of dilated attention, around a pluggable dense kernel.

Every branch ``(w, r)`` and phase ``p`` is a batch of independent dense problems over a strided
view of the ``(batch, seq, heads, head_dim)`` input (rows ``p, p + r, ...`` of heads
``p, p + r, ...``), cut into segments of ``w / r`` rows; the last segment may be shorter. The
reference (:mod:`dilated.core.reference`) and every backend that calls a dense attention kernel
(dilated-kernels' sdpa and flash) supply only that kernel (:data:`DenseAttention`); the branches
are merged with :func:`dilated.core.merge.merge_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dilated.core.merge import merge_attention

__all__ = ["DenseAttention", "compute_dtype", "phase_heads", "run_branches"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sub-problems are computed in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def phase_heads(heads_q: int, heads_kv: int, rate: int, phase: int) -> tuple[slice, torch.Tensor]:
    """Query heads of one phase (``j mod rate == phase``) and the key/value head each one reads.

    Returns a slice over query heads and a long tensor of key/value head indices (``j // group``).
    """
    group = heads_q // heads_kv
    return slice(phase, heads_q, rate), torch.arange(phase, heads_q, rate) // group


#: ``(q, k, v, key_mask, scale, is_causal, dropout_p) -> (out, lse)`` over ``(B, L, H, D)``
#: inputs (``key_mask`` ``(B, L)`` or None); returns ``out`` ``(B, L, H, D)`` in the compute dtype
#: and ``lse`` ``(B, H, L)`` float32 (float64 for float64 inputs), ``-inf`` for empty rows.
DenseAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool, float],
    tuple[torch.Tensor, torch.Tensor],
]


def _one_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: int,
    r: int,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    dense: DenseAttention,
    lse_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    out = q.new_zeros(b, n, hq, d)
    lse = torch.full((b, hq, n), float("-inf"), dtype=lse_dtype, device=q.device)
    rows_per_segment = w // r
    for p in range(min(r, hq, n)):
        heads, kv_heads = phase_heads(hq, hkv, r, p)
        qp = q[:, p::r, heads]
        if hkv == hq:
            kp, vp = k[:, p::r, heads], v[:, p::r, heads]
        else:
            idx = kv_heads.to(q.device)
            kp, vp = k[:, p::r].index_select(2, idx), v[:, p::r].index_select(2, idx)
        mp = None if key_padding_mask is None else key_padding_mask[:, p::r]
        rows = qp.shape[1]
        full = (n // w) * rows_per_segment
        outs, lses = [], []
        # Full segments form one batched problem, the shorter last segment a second one, so that
        # no padding token ever enters a softmax.
        for start, stop, length in ((0, full, rows_per_segment), (full, rows, rows - full)):
            if stop <= start or length == 0:
                continue
            count = (stop - start) // length

            def cut(
                x: torch.Tensor,
                start: int = start,
                stop: int = stop,
                count: int = count,
                length: int = length,
            ) -> torch.Tensor:
                part = x[:, start:stop]
                return part.reshape(b * count, length, *x.shape[2:])

            o_part, l_part = dense(
                cut(qp),
                cut(kp),
                cut(vp),
                None if mp is None else cut(mp),
                scale,
                is_causal,
                dropout_p,
            )
            h = qp.shape[2]
            outs.append(o_part.reshape(b, count * length, h, d))
            lses.append(l_part.reshape(b, count, h, length).permute(0, 2, 1, 3).reshape(b, h, -1))
        out[:, p::r, heads] = torch.cat(outs, dim=1).to(out.dtype)
        lse[:, heads, p::r] = torch.cat(lses, dim=2).to(lse_dtype)
    return out, lse


def run_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    dense: DenseAttention,
    work_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention on validated inputs with ``dense`` as the per-segment kernel.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, kv_heads, head_dim)``.
        v: shaped like ``k``.
        segment_lengths: the validated ``w_i``.
        dilation_rates: the validated ``r_i``.
        scale: softmax scale.
        is_causal: causal masking inside each segment.
        key_padding_mask: bool ``(batch, seq)``, True = real token, or None.
        dropout_p: dropout on the probabilities.
        dense: the dense kernel.
        work_dtype: dtype the inputs are cast to before ``dense`` (default: keep them).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``, ``lse``
        ``(batch, heads, seq)`` float32 (float64 for float64 inputs).
    """
    lse_dtype = compute_dtype(q.dtype)
    out_dtype = q.dtype
    if work_dtype is not None:
        q, k, v = q.to(work_dtype), k.to(work_dtype), v.to(work_dtype)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        o, lse = _one_branch(
            q, k, v, w, r, scale, is_causal, key_padding_mask, dropout_p, dense, lse_dtype
        )
        outs.append(o.to(lse_dtype))
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    return out.to(out_dtype), lse
