"""The one log-sum-exp merge of partial attention results.

Dilated branches, ring steps, sparse blocks and KV-cache chunks each produce a partial output
``O_i`` normalised over its own keys, and that set's log-sum-exp ``lse_i``. Their union is::

    L = logsumexp_i lse_i
    O = sum_i exp(lse_i - L) * O_i

A row that no part covers (every ``lse_i = -inf``) gets ``O = 0`` and ``L = -inf``, never NaN, in
the forward pass and in the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_attention", "merge_into", "safe_logsumexp"]


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` over ``dim`` whose rows of all ``-inf`` give ``-inf`` with zero gradient.

    ``torch.logsumexp`` returns ``-inf`` for such rows but its backward pass produces NaN there
    (``exp(-inf - -inf)``), which poisons every gradient it touches; this one does not.
    """
    m = x.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(x - m).sum(dim=dim, keepdim=True)
    empty = total == 0
    lse = torch.log(torch.where(empty, torch.ones_like(total), total)) + m
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    return lse.squeeze(dim)


def merge_attention(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results by their log-sum-exp; differentiable in every input.

    Args:
        outputs: partial outputs, each ``(batch, seq, heads, head_dim)``, each normalised over its
            own key set (zero where that set is empty).
        lses: their log-sum-exps, each ``(batch, heads, seq)``, ``-inf`` where the key set is empty.

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``outputs[0]``,
        ``lse`` ``(batch, heads, seq)`` in the dtype of ``lses[0]``. The weights are computed in at
        least float32.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(
            f"merge_attention needs as many lses as outputs (at least one), got {len(outputs)} "
            f"outputs and {len(lses)} lses"
        )
    shape = outputs[0].shape
    for i, (o, lse) in enumerate(zip(outputs, lses)):
        if o.dim() != 4 or o.shape != shape:
            raise ValueError(
                f"outputs[{i}] must have shape (batch, seq, heads, head_dim) = {tuple(shape)}, "
                f"got {tuple(o.shape)}"
            )
        expected = (shape[0], shape[2], shape[1])
        if tuple(lse.shape) != expected:
            raise ValueError(
                f"lses[{i}] must have shape (batch, heads, seq) = {expected}, got {tuple(lse.shape)}"
            )
    if len(outputs) == 1:
        return outputs[0], lses[0]
    acc = torch.promote_types(lses[0].dtype, torch.float32)
    stacked = torch.stack([lse.to(acc) for lse in lses])  # (m, b, h, n)
    total = safe_logsumexp(stacked, dim=0)  # (b, h, n)
    finite_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(stacked - finite_total)  # (m, b, h, n); 0 for empty parts
    out = torch.zeros(shape, dtype=acc, device=outputs[0].device)
    for o, w in zip(outputs, weights):
        out = out + o.to(acc) * w.transpose(1, 2).unsqueeze(-1)
    return out.to(outputs[0].dtype), total.to(lses[0].dtype)


def merge_into(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Merge one partial result into running float32 accumulators, in place (no autograd).

    The online form of [`merge_attention`][dilated.core.merge.merge_attention], used where parts
    arrive one at a time (ring steps, sparse block runs): the accumulators stay float32 whatever
    the dtype of ``out``, so the rounding error does not grow with the number of parts.

    Args:
        acc_out: ``(batch, rows, heads, head_dim)`` float32, may be a strided view.
        acc_lse: ``(batch, heads, rows)`` float32, ``-inf`` where nothing was merged yet.
        out: the part's output, shaped like ``acc_out``, any float dtype.
        lse: the part's log-sum-exp, shaped like ``acc_lse``, ``-inf`` for rows it does not cover.
    """
    new = torch.logaddexp(acc_lse, lse)
    # Rows still empty on both sides stay -inf; shifting them by 0 keeps exp() NaN-free.
    shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    keep = torch.exp(acc_lse - shift).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(keep).add_(out.to(acc_out.dtype) * take)
    acc_lse.copy_(new)
