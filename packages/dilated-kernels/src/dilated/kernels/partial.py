"""Dilated attention as one part of a larger log-sum-exp merge: forward and backward, no autograd.

A caller that merges the result with other parts (the ring's branches that span ranks, a
sequence-parallel head slice) needs the forward pass on its own, ``(out, lse)`` with the float32
LSE, and the backward pass evaluated with the FINAL merged output and LSE, which may include keys
this part never saw. Both run on the fused ``"cudnn"`` backend when it can take the call (CUDA,
16-bit, no dropout, the whole head range) and otherwise as one
[`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] call per branch, phase
and run of segments ([`subproblems`][dilated.core.branches.subproblems]). Inputs are validated
by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.branches import SubProblem, compute_dtype, head_index, run_branches, subproblems
from dilated.core.reference import call_dropout_seed
from dilated.kernels.backends import cudnn
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward

__all__ = ["dilated_attention_backward", "dilated_attention_forward"]


def _fused(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    head_offset: int,
) -> bool:
    # Dropout keeps the per-call seeds this module hands out (the fused path draws its own).
    return (
        head_offset == 0
        and dropout_p == 0.0
        and q.is_cuda
        and cudnn.unsupported_reason(q, k, key_padding_mask, dropout_p) is None
    )


def dilated_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    head_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of dilated attention, without autograd.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k, v: ``(batch, seq, kv_heads, head_dim)``.
        segment_lengths, dilation_rates, scale, is_causal: validated, as in
            [`dilated_attention`][dilated.kernels.dilated_attention].
        key_padding_mask: bool ``(batch, seq)`` in the internal form (True = a key that may be
            attended) that [`prepare_call`][dilated.core.functional.prepare_call] makes of the
            public mask, or None.
        dropout_p: dropout on the probabilities; needs ``dropout_seed``.
        dropout_seed: the seed the dropout masks are drawn from (give the same one to
            [`dilated_attention_backward`][dilated.kernels.partial.dilated_attention_backward]).
        head_offset: local head ``j`` takes the phase of head ``head_offset + j`` of a larger
            layer (a sequence-parallel head slice).

    Returns:
        ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q`` and ``lse``
        ``(batch, heads, seq)`` float32 (float64 for float64 inputs).
    """
    if _fused(q, k, key_padding_mask, dropout_p, head_offset):
        with torch.no_grad():
            return cudnn.forward_no_grad(
                q, k, v, segment_lengths, dilation_rates, scale, is_causal, key_padding_mask
            )
    calls = 0

    def dense(
        qs: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        mask: torch.Tensor | None,
        sc: float,
        causal: bool,
        p: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        seed = call_dropout_seed(dropout_seed, calls)
        calls += 1
        return subproblem_attention(
            qs, ks, vs, scale=sc, is_causal=causal, key_mask=mask, dropout_p=p, dropout_seed=seed
        )

    with torch.no_grad():
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
            dense=dense,
            head_offset=head_offset,
        )


def _add_rows(
    acc: torch.Tensor, sp: SubProblem, heads: slice | tuple[int, ...], part: torch.Tensor
) -> None:
    """Add a call's gradient ``part`` into ``acc`` ``(batch, seq, heads, head_dim)``."""
    rows = acc[:, sp.phase :: sp.rate][:, sp.start : sp.stop]
    grad = sp.uncut(part, acc.shape[0]).to(acc.dtype)
    if isinstance(heads, slice):
        rows[:, :, heads] += grad
    else:
        # Query heads that share a key/value head (grouped-query attention) add into it.
        index = head_index(heads, acc.device)
        if isinstance(index, slice):
            rows[:, :, index] += grad
        else:
            rows.index_add_(2, index, grad)


def dilated_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    head_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This part's ``(dq, dk, dv)`` given the FINAL merged ``out`` and ``lse`` of every row.

    Args:
        grad_out: gradient of the final output, ``(batch, seq, heads, head_dim)``.
        q, k, v, segment_lengths, dilation_rates, scale, is_causal, key_padding_mask, dropout_p, dropout_seed, head_offset: as given to
            [`dilated_attention_forward`][dilated.kernels.partial.dilated_attention_forward].
        out: the final merged output ``(batch, seq, heads, head_dim)``.
        lse: the final merged LSE ``(batch, heads, seq)``.

    Returns:
        Gradients shaped like ``q``, ``k``, ``v``: in their dtypes on the fused path, else in
        float32 (float64 for float64 inputs), accumulated over the calls without rounding.
    """
    if _fused(q, k, key_padding_mask, dropout_p, head_offset):
        return cudnn.backward_from_merged(
            q, k, v, out, lse, grad_out, segment_lengths, dilation_rates, scale, is_causal,
            key_padding_mask,
        )  # fmt: skip
    n, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
    work = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    calls = 0
    for w, r in zip(segment_lengths, dilation_rates):
        for sp in subproblems(n, hq, hkv, w, r, head_offset):
            kv = sp.kv_view(hq, hkv)
            gq, gk, gv = subproblem_attention_backward(
                sp.cut(grad_out, sp.heads),
                sp.cut(q, sp.heads),
                sp.cut(k, kv),
                sp.cut(v, kv),
                sp.cut(out, sp.heads),
                sp.cut_lse(lse),
                scale=scale,
                is_causal=is_causal,
                key_mask=sp.cut_mask(key_padding_mask),
                dropout_p=dropout_p,
                dropout_seed=call_dropout_seed(dropout_seed, calls),
            )
            calls += 1
            _add_rows(dq, sp, sp.heads, gq)
            _add_rows(dk, sp, kv, gk)
            _add_rows(dv, sp, kv, gv)
    return dq, dk, dv
