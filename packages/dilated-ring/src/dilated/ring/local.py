"""Attention of one block of query rows against one block of key rows, with an explicit mask.

The ring computes, for each dilated branch and phase, the query rows of this rank against the
key rows of one rank at a time; the positions of both decide which pairs are allowed (same
segment, causal). This module holds that block computation, forward ``(out, lse)`` and the
gradient given the final log-sum-exp, in plain PyTorch.
"""

from __future__ import annotations

import torch

__all__ = ["block_attention", "block_grads", "pair_mask"]


def pair_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, segment_length: int, is_causal: bool
) -> torch.Tensor:
    """Bool ``(nq, nk)``: key position ``k_pos[u]`` is allowed for query position ``q_pos[t]``."""
    mask = (q_pos[:, None] // segment_length) == (k_pos[None, :] // segment_length)
    if is_causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    return mask


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    # (b, nq, h, d) x (b, nk, h, d) -> (b, h, nq, nk)
    return torch.einsum("bthd,buhd->bhtu", q, k) * scale


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of one block.

    Args:
        q: ``(b, nq, h, d)``; k, v: ``(b, nk, h, d)``; all in the compute dtype.
        mask: bool ``(nq, nk)``, or broadcastable to ``(b, h, nq, nk)`` (e.g. ``(b, 1, nq, nk)``
            with a key padding mask), True = allowed.
        scale: softmax scale.

    Returns:
        ``out`` ``(b, nq, h, d)`` (0 for rows with no allowed key) and ``lse`` ``(b, h, nq)``
        (``-inf`` there).
    """
    s = _scores(q, k, scale).masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    out = torch.einsum("bhtu,buhd->bthd", p / safe, v)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), torch.log(safe) + m)
    return out, lse.squeeze(-1)


def block_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v of one block given the FINAL log-sum-exp of the whole attention.

    The merged output is one softmax over every key any branch or block lets a query see, so
    with ``P = exp(s - L)`` (``L`` the final lse), ``dV = P^T dO`` and
    ``dS = P * (dO V^T - D)`` with ``D = rowsum(dO * O)`` hold block by block.

    Args:
        q, k, v, mask, scale: as in :func:`block_attention`.
        lse: final ``L`` ``(b, h, nq)``; d_out ``(b, nq, h, d)``; delta ``D`` ``(b, h, nq)``.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``.
    """
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    s = _scores(q, k, scale)
    p = torch.where(mask, torch.exp(s - finite_lse[..., None]), torch.zeros_like(s))
    dv = torch.einsum("bhtu,bthd->buhd", p, d_out)
    dp = torch.einsum("bthd,buhd->bhtu", d_out, v)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhtu,buhd->bthd", ds, k)
    dk = torch.einsum("bhtu,bthd->buhd", ds, q)
    return dq, dk, dv
