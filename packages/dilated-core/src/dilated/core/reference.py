"""The reference implementation of dilated attention in plain PyTorch.

Every branch ``(w, r)`` and phase ``p`` is a set of independent dense problems: the rows
``t = p, p + r, ...`` of the heads ``j = p, p + r, ...``, cut into segments of ``w / r`` rows.
Those rows are a strided view of the ``(batch, seq, heads, head_dim)`` input (stride ``r`` over
seq and over heads), so no ``seq x seq`` mask is built and memory grows linearly with ``seq``.
The loop over branches and phases is [`dilated.core.branches.run_branches`][dilated.core.branches.run_branches]; this module supplies
its dense kernel, which also yields the log-sum-exp. Inputs are assumed valid:
[`dilated.core.functional`][dilated.core.functional] checks them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dilated.core.branches import compute_dtype, phase_heads, run_branches

__all__ = [
    "attention_backward_with_lse",
    "attention_output",
    "attention_with_lse",
    "call_dropout_seed",
    "compute_dtype",
    "dense_segment_attention",
    "dense_segment_attention_backward",
    "derive_dropout_seed",
    "dilated_attention_reference",
    "draw_dropout_seed",
    "dropout_keep_mask",
    "dropout_seed_value",
    "phase_heads",
]


def draw_dropout_seed(dropout_p: float) -> torch.Tensor | None:
    """One call's dropout seed: a CPU int64 tensor ``(1,)`` drawn from torch's default CPU
    generator (reproducible under ``torch.manual_seed``; reading it is no device sync, and a
    compiled graph draws it too), or None without dropout."""
    return torch.randint(1 << 62, (1,), dtype=torch.int64) if dropout_p > 0.0 else None


def dropout_seed_value(seed: torch.Tensor | None) -> int | None:
    """The ``int`` of a seed from [`draw_dropout_seed`][dilated.core.reference.draw_dropout_seed]
    (a CPU tensor: no device sync), or None."""
    return None if seed is None else int(seed.item())


def call_dropout_seed(seed: int | None, call: int) -> int | None:
    """The seed of dense call number ``call`` of a pass whose seed is ``seed`` (None: no
    dropout): both passes enumerate the calls in the same order, so the backward replays each
    call's mask."""
    return None if seed is None else seed + call


def derive_dropout_seed(seed: int | None, *coordinates: int) -> int | None:
    """A seed for one part of a call (a rank, a branch, a ring step), mixed from the call's
    ``seed`` and the part's integer ``coordinates`` (None: no dropout): the same in both passes,
    different for every part, so that parts never share a mask."""
    if seed is None:
        return None
    mixed = seed
    for x in coordinates:
        mixed = (mixed * 1_000_003 + x + 1) % (1 << 62)
    return mixed


def dropout_keep_mask(
    shape: Sequence[int], dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Bool keep-mask of dropout with probability ``dropout_p``, drawn from ``seed`` alone.

    The same ``(shape, seed, device)`` always gives the same mask, which is what lets a backward
    pass that recomputes the probabilities (from the final log-sum-exp) drop the same entries as
    the forward pass did.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator, device=device) >= dropout_p


def _allowed(
    n_q: int, n_k: int, is_causal: bool, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool ``(..., n_q, n_k)`` mask of allowed pairs (top-left causal), or None for all."""
    allowed: torch.Tensor | None = None
    if is_causal:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
    if key_mask is not None:
        km = key_mask.unsqueeze(-2)
        allowed = km if allowed is None else allowed & km
    return allowed


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over the last two dims that also returns the log-sum-exp.

    Args:
        q: ``(..., L, d)`` (computed in its own dtype).
        k: ``(..., L_k, d)`` with the leading dims of ``q``.
        v: shaped like ``k``.
        scale: softmax scale.
        is_causal: key ``u`` is allowed for query ``t`` only when ``u <= t`` (top-left aligned).
        key_mask: bool, broadcastable to ``(..., L_k)`` over keys; True = allowed.
        dropout_p: dropout on the attention probabilities (0 disables it).
        dropout_seed: draw the dropout mask from this seed
            ([`dropout_keep_mask`][dilated.core.reference.dropout_keep_mask]) instead of the
            global generator, so that
            [`attention_backward_with_lse`][dilated.core.reference.attention_backward_with_lse]
            can drop the same entries.

    Returns:
        ``(out, lse)``: ``out`` ``(..., L, d)``, zero for a query with no allowed key, and ``lse``
        ``(..., L)``, ``-inf`` there. ``lse`` is the log-sum-exp before dropout, so that partial
        results merge into one softmax whose probabilities are then dropped. Gradients stay
        finite in both cases.
    """
    out, row_max, total, empty = _softmax_attention(
        q, k, v, scale, is_causal, key_mask, dropout_p, dropout_seed
    )
    if total is None:
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
        return out, lse
    lse = torch.log(total) + row_max
    lse = torch.where(empty, float("-inf"), lse)
    return out, lse.squeeze(-1)


def attention_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output of [`attention_with_lse`][dilated.core.reference.attention_with_lse] without
    its log-sum-exp (three launches fewer, for a decoding step): ``(..., L, d)``, zero for a
    query with no allowed key; arguments as there."""
    return _softmax_attention(q, k, v, scale, False, key_mask, 0.0, None)[0]


def _softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    is_causal: bool,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(out, row max, row total, empty rows)``: the softmax's sum of exponentials with its
    empty rows set to 1 (None with no key at all, where ``out`` is a zero of the right shape)."""
    if k.shape[-2] == 0:
        # No key at all: the empty-set convention, kept differentiable (zero gradients).
        out = torch.matmul(q, k.transpose(-1, -2)) @ v
        return out, out, None, out
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = _allowed(scores.shape[-2], scores.shape[-1], is_causal, key_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    # One launch each (isfinite is four, a *_like fill one more): a decoding step calls this
    # once per layer and is bound by its launches.
    row_max = torch.nan_to_num(row_max, nan=0.0, posinf=0.0, neginf=0.0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0
    safe_total = torch.where(empty, 1.0, total)
    probs = weights / safe_total
    if dropout_p > 0.0:
        if dropout_seed is None:
            probs = F.dropout(probs, p=dropout_p, training=True)
        else:
            keep = dropout_keep_mask(probs.shape, dropout_p, dropout_seed, probs.device)
            probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v), row_max, safe_total, empty


def attention_backward_with_lse(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v of one part of an attention whose FINAL output and LSE are given.

    When several parts (branches, ring steps, blocks) are merged by log-sum-exp they are one
    softmax over the union of their keys, so with ``P = exp(S - L)`` (``L`` the final ``lse``)
    and ``Delta = rowsum(dO * O)`` (``O`` the final ``out``) each part contributes
    ``dV = P^T dO`` and ``dS = P * (dO V^T - Delta)``, whatever the other parts are. With dropout
    the dropped probabilities are those of ``dropout_seed`` (as in
    [`attention_with_lse`][dilated.core.reference.attention_with_lse]).

    Args:
        grad_out: ``(..., L, d)``, the gradient of the final output rows.
        q, k, v, scale, is_causal, key_mask: as in
            [`attention_with_lse`][dilated.core.reference.attention_with_lse].
        out: the final output ``(..., L, d)``; lse: the final log-sum-exp ``(..., L)``
            (``-inf`` for rows no part covers).
        dropout_p, dropout_seed: the forward pass's dropout.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``, in the dtype of ``q``.
    """
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_seed is required with dropout_p > 0: the mask must be replayed")
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = torch.exp(scores - finite_lse.to(scores.dtype).unsqueeze(-1))
    allowed = _allowed(scores.shape[-2], scores.shape[-1], is_causal, key_mask, q.device)
    if allowed is not None:
        probs = probs.masked_fill(~allowed, 0.0)
    delta = (grad_out * out).sum(-1, keepdim=True)
    d_probs = torch.matmul(grad_out, v.transpose(-1, -2))
    dropped = probs
    if dropout_p > 0.0:
        assert dropout_seed is not None
        keep = dropout_keep_mask(probs.shape, dropout_p, dropout_seed, probs.device)
        dropped = probs * keep / (1.0 - dropout_p)
        d_probs = d_probs * keep / (1.0 - dropout_p)
    dv = torch.matmul(dropped.transpose(-1, -2), grad_out)
    d_scores = probs * (d_probs - delta) * scale
    dq = torch.matmul(d_scores, k)
    dk = torch.matmul(d_scores.transpose(-1, -2), q)
    return dq, dk, dv


def _heads_first(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(B, L, H, D)`` -> ``(B, H, L, D)``, key/value heads repeated for their query heads."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return qt, kt, vt, None if key_mask is None else key_mask[:, None, :]


def dense_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`DenseAttention`][dilated.core.branches.DenseAttention] in plain PyTorch.

    Inputs ``q`` ``(B, L, H, D)``, ``k``/``v`` ``(B, L_k, H_kv, D)`` (``H % H_kv == 0``: query head
    ``j`` reads key/value head ``j // (H / H_kv)``) and ``key_mask`` ``(B, L_k)``; computed in the
    dtype of ``q``. Returns ``out`` ``(B, L, H, D)`` and ``lse`` ``(B, H, L)``.
    """
    qt, kt, vt, km = _heads_first(q, k, v, key_mask)
    out, lse = attention_with_lse(
        qt,
        kt,
        vt,
        scale,
        is_causal=is_causal,
        key_mask=km,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    return out.transpose(1, 2), lse


def dense_segment_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of [`dense_segment_attention`][dilated.core.reference.dense_segment_attention]
    given the FINAL merged ``out`` ``(B, L, H, D)`` and ``lse`` ``(B, H, L)`` of its rows (see
    [`attention_backward_with_lse`][dilated.core.reference.attention_backward_with_lse]).

    Returns ``(dq, dk, dv)`` ``(B, L, H, D)``, ``(B, L_k, H_kv, D)`` twice (grouped query heads
    summed into their key/value head), in the dtype of ``q``.
    """
    qt, kt, vt, km = _heads_first(q, k, v, key_mask)
    dq, dk, dv = attention_backward_with_lse(
        grad_out.transpose(1, 2),
        qt,
        kt,
        vt,
        out.transpose(1, 2),
        lse,
        scale,
        is_causal=is_causal,
        key_mask=km,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    b, hkv, lk, d = k.shape[0], k.shape[2], k.shape[1], k.shape[3]
    group = q.shape[2] // hkv
    dk = dk.reshape(b, hkv, group, lk, d).sum(2)
    dv = dv.reshape(b, hkv, group, lk, d).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


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
    """Dilated attention (the definition of the docs' Concepts page) on validated inputs.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, kv_heads, head_dim)``.
        v: shaped like ``k``.
        segment_lengths: ``w_i`` of each branch (already validated).
        dilation_rates: ``r_i`` of each branch (already validated).
        scale: softmax scale.
        is_causal: as in [`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention].
        key_padding_mask: bool ``(batch, seq)`` in the internal form (True = a key that may be
            attended: the public mask converted by
            [`prepare_call`][dilated.core.functional.prepare_call]), or None.
        dropout_p: as in [`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention].

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
