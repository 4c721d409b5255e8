"""The ring and all-gather strategies as ``torch.library`` custom ops, with fake and autograd.

``torch.compile`` treats the two ops (``dilated_ring::attention`` and its backward) as leaves:
their fake implementations give the output shapes, so a compiled model holds no graph break at
the attention, while the transfers and the per-call loops run in eager Python inside the op.
Every argument is a tensor or a plain value of the call (branches, scale, sharding, ...); the
process group travels as its key ([`group_key`][dilated.ring.comm.group_key]), so one compiled
graph serves every call with the same options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.branches import compute_dtype
from dilated.core.caching import plan_cache
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.ring.comm import gather_key_padding_mask, make_comm, resolve_group
from dilated.ring.ring import RingPlan, ring_backward, ring_forward

__all__ = ["ring_attention"]

_OPTIONS = (
    "int[] segment_lengths, int[] dilation_rates, float scale, bool is_causal, "
    "str load_balance, str strategy, str group, int rank, int world_size, float? timeout_s, "
    "float dropout_p"
)


@plan_cache("dilated.ring.op.plan", maxsize=1024, key="the op's options and the shard's shape")
def _plan(
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    scale: float,
    is_causal: bool,
    load_balance: str,
    strategy: str,
    group: str,
    rank: int,
    world_size: int,
    timeout_s: float | None,
    dropout_p: float,
    seq: int,
    heads: int,
    kv_heads: int,
) -> RingPlan:
    return RingPlan(
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        scale=scale,
        is_causal=is_causal,
        load_balance=load_balance,
        group=resolve_group(group),
        rank=rank,
        world_size=world_size,
        seq=seq,
        heads=heads,
        kv_heads=kv_heads,
        strategy=strategy,
        timeout_s=timeout_s,
        dropout_p=dropout_p,
    )


def _plan_of(q: torch.Tensor, k: torch.Tensor, seed: torch.Tensor | None, *opts: Any) -> RingPlan:
    ws, rs, *rest = opts
    world = rest[6]
    plan = _plan(tuple(ws), tuple(rs), *rest, q.shape[1] * world, q.shape[2], k.shape[2])
    value = dropout_seed_value(seed)
    # The seed lives in a CPU tensor, so that a compiled graph draws it without a host read.
    return plan if value is None else plan.with_seed(value)


@torch.library.custom_op(
    "dilated_ring::attention",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? seed, {_OPTIONS}) "
    "-> (Tensor, Tensor, Tensor)",
)
def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_of(q, k, seed, *opts)
    comm = make_comm(plan.group, plan.timeout_s)
    whole_mask = None
    if key_mask is not None:
        whole_mask = gather_key_padding_mask(key_mask, plan.load_balance, plan.world_size, comm)
    out, lse = ring_forward(plan, q, k, v, comm, whole_mask, key_mask)
    # Outputs may not alias inputs (a world of one "gathers" the mask it was given).
    kept = torch.empty(0, dtype=torch.bool, device=q.device) if whole_mask is None else whole_mask
    return out, lse, kept.clone() if kept is key_mask else kept


@_attention.register_fake
def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, h, _ = q.shape
    world = opts[8]
    lse = q.new_empty((b, h, s), dtype=compute_dtype(q.dtype))
    if key_mask is None:
        mask = q.new_empty((0,), dtype=torch.bool)
    else:
        mask = key_mask.new_empty((b, s * world))
    return torch.empty_like(q), lse, mask


@torch.library.custom_op(
    "dilated_ring::attention_backward",
    mutates_args=(),
    schema="(Tensor d_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    f"Tensor? whole_mask, Tensor? key_mask, Tensor? seed, {_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    whole_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_of(q, k, seed, *opts)
    comm = make_comm(plan.group, plan.timeout_s)
    return ring_backward(plan, q, k, v, out, lse, d_out, comm, whole_mask, key_mask)


@_attention_backward.register_fake
def _attention_backward_fake(
    d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    q, k, v, key_mask, seed, *opts = inputs
    out, lse, whole_mask = output
    ctx.save_for_backward(q, k, v, out, lse, whole_mask, key_mask, seed)
    ctx.masked = key_mask is not None
    ctx.opts = opts


def _backward(
    ctx: Any, d_out: torch.Tensor | None, _d_lse: Any, _d_mask: Any
) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, whole_mask, key_mask, seed = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    grads = _attention_backward(
        d_out, q, k, v, out, lse, whole_mask if ctx.masked else None, key_mask, seed, *ctx.opts
    )
    return (*grads, *([None] * (2 + len(ctx.opts))))


_attention.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(
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
    load_balance: str,
    strategy: str,
    group: str,
    rank: int,
    world_size: int,
    timeout_s: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the ring or all-gather strategy on validated shards (``lse`` detached).

    ``group`` is the key of the process group ([`group_key`][dilated.ring.comm.group_key]);
    the other arguments are those of
    [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention], checked.
    """
    seed = draw_dropout_seed(dropout_p)
    out, lse, _ = _attention(
        q, k, v, key_padding_mask, seed, list(segment_lengths), list(dilation_rates), scale,
        is_causal, load_balance, strategy, group, rank, world_size, timeout_s, dropout_p,
    )  # fmt: skip
    return out, lse.detach()
