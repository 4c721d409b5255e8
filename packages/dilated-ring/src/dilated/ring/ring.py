"""One rank's passes of the ring and all-gather strategies over a sequence split into shards.

Branches whose segments lie inside a run of a rank's positions are *local*: they are exactly the
single-GPU op on the shard ([`dilated.kernels.partial`][dilated.kernels.partial], the fused cuDNN
path on CUDA). Each branch whose segments span ranks is the dense block body
([`DenseBlockBody`][dilated.ring.dense_block.DenseBlockBody]) driven by the schedule the
strategy names ([`dilated.ring.schedules`][dilated.ring.schedules]): the same schedule moves the
blocks of the forward pass and, in the backward pass, the blocks and their gradients. Every
partial result merges into float32 accumulators; nothing is stored between the passes but the
output and the LSE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.kernels.partial import dilated_attention_backward, dilated_attention_forward
from dilated.ring.comm import Transport, make_comm
from dilated.ring.dense_block import BackwardRows, DenseBlockBody, ForwardRows
from dilated.ring.plan import RingPlan
from dilated.ring.schedule import run_backward, run_forward
from dilated.ring.schedules import get_schedule

__all__ = ["RingPlan", "ring_backward", "ring_forward", "ring_passes"]


def ring_forward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    comm: Transport,
    key_mask: torch.Tensor | None = None,
    key_mask_shard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of this rank's queries over every branch, outside autograd.

    Args:
        plan: the call.
        q, k, v: this rank's shards ``(batch, seq / P, heads | kv_heads, head_dim)``.
        comm: the transport of ``plan.group``.
        key_mask: the whole-sequence ``(batch, seq)`` key mask in the internal form (True = a key that may be attended) or None.
        key_mask_shard: this rank's ``(batch, seq / P)`` rows of it.

    Returns:
        ``out`` ``(batch, seq / P, heads, head_dim)`` in q's dtype and ``lse``
        ``(batch, heads, seq / P)`` float32 (float64 for float64 inputs).
    """
    local_ws, local_rs = plan.local_branches()
    spanning = plan.spanning_branches()
    options = {
        "scale": plan.scale,
        "is_causal": plan.is_causal,
        "key_padding_mask": key_mask_shard,
        "dropout_p": plan.dropout_p,
        "dropout_seed": plan.seed(-1),
    }
    local = None
    if local_ws:
        local = dilated_attention_forward(q, k, v, local_ws, local_rs, **options)  # type: ignore[arg-type]
        if not spanning:
            return local
    work = compute_dtype(q.dtype)
    b, s, h, d = q.shape
    if local is not None:
        # The local result starts the float32 accumulators (one pass, no zero-fill); the LSE
        # accumulator is (batch, seq / P, heads), laid out like the rows of q (one geometry).
        acc = local[0].to(work, memory_format=torch.contiguous_format, copy=True)
        acc_lse = _rows_major(local[1], work)
    else:
        acc = torch.zeros(b, s, h, d, dtype=work, device=q.device)
        acc_lse = torch.full((b, s, h), float("-inf"), dtype=work, device=q.device)
    schedule = get_schedule(plan.strategy)
    rows = ForwardRows(q.contiguous(), acc, acc_lse)
    k, v = k.contiguous(), v.contiguous()
    mask = None if key_mask is None else key_mask.contiguous()
    for branch in spanning:
        run_forward(schedule, DenseBlockBody(plan, branch, k, v, rows, mask), comm)
    return acc.to(q.dtype), acc_lse.transpose(1, 2).contiguous()


def _rows_major(lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``(batch, seq, heads)`` copy of an LSE ``(batch, heads, seq)``."""
    return lse.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format, copy=True)


def ring_backward(
    plan: RingPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    comm: Transport,
    key_mask: torch.Tensor | None = None,
    key_mask_shard: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shards given the final ``out``/``lse`` of
    [`ring_forward`][dilated.ring.ring.ring_forward] (outside autograd; every rank calls it).

    Returns gradients in the dtypes of ``q``, ``k``, ``v``.
    """
    local_ws, local_rs = plan.local_branches()
    spanning = plan.spanning_branches()
    d_out = d_out.to(q.dtype)
    local = None
    if local_ws:
        local = dilated_attention_backward(
            d_out, q, k, v, out, lse, local_ws, local_rs, scale=plan.scale,
            is_causal=plan.is_causal, key_padding_mask=key_mask_shard,
            dropout_p=plan.dropout_p, dropout_seed=plan.seed(-1),
        )  # fmt: skip
        if not spanning:
            return local[0].to(q.dtype), local[1].to(k.dtype), local[2].to(v.dtype)
    work = compute_dtype(q.dtype)
    if local is not None:
        grads = [g.to(work, memory_format=torch.contiguous_format, copy=True) for g in local]
    else:
        grads = [torch.zeros(x.shape, dtype=work, device=q.device) for x in (q, k, v)]
    dq, dk, dv = grads
    schedule = get_schedule(plan.strategy)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lse_rows = _rows_major(lse, work)
    rows = BackwardRows(q, out.contiguous(), lse_rows, d_out.contiguous(), dq, dk, dv)
    mask = None if key_mask is None else key_mask.contiguous()
    for branch in spanning:
        run_backward(schedule, DenseBlockBody(plan, branch, k, v, rows, mask), comm)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def ring_passes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: Any = None,
    is_causal: bool = False,
    load_balance: str = "contiguous",
    strategy: str = "ring",
    scale: float | None = None,
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's forward and backward passes without autograd: ``(out, dq, dk, dv)``.

    For rings of [`dilated.ring.loopback`][dilated.ring.loopback] threads on CUDA, where autograd
    runs every backward of a device on one engine thread, so the ranks' backward passes would
    wait for each other there. Inputs as in
    [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention] (not validated);
    ``d_out`` is the gradient of this rank's output rows.
    """
    comm = make_comm(group, timeout_s)
    plan = RingPlan(
        segment_lengths=tuple(segment_lengths),
        dilation_rates=tuple(dilation_rates),
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        is_causal=is_causal,
        load_balance=load_balance,
        group=group,
        rank=comm.rank,
        world_size=comm.world_size,
        seq=q.shape[1] * comm.world_size,
        heads=q.shape[2],
        kv_heads=k.shape[2],
        strategy=strategy,
        timeout_s=timeout_s,
    )
    out, lse = ring_forward(plan, q, k, v, comm)
    return (out, *ring_backward(plan, q, k, v, out, lse, d_out, comm))
