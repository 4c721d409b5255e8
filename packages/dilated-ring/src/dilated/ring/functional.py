"""The public functional op of dilated-ring: checks on every rank, then the chosen strategy."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dilated.core.functional import prepare_call
from dilated.ring.comm import RingComm, gather_key_padding_mask
from dilated.ring.ring import RingPlan, ring_dilated_attention_function
from dilated.ring.sharding import chunk_length
from dilated.ring.ulysses import check_ulysses_heads, ulysses_attention
from dilated.ring.validation import agree_across_ranks, check_branch_layout

__all__ = ["group_rank_and_size", "ring_dilated_attention"]

_STRATEGIES = ("ring", "allgather", "ulysses")


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    group: dist.ProcessGroup | None = None,
    load_balance: str = "contiguous",
    strategy: str = "ring",
    timeout_s: float | None = None,
    return_lse: bool = False,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention (SPEC.md) of a sequence sharded over the ranks of ``group``.

    Every rank calls it with its shard; the result is this rank's rows of the single-process
    result on the whole sequence.

    Args:
        q: this rank's queries ``(batch, seq / P, heads, head_dim)``, sharded as ``load_balance``
            says (see :mod:`dilated.ring.sharding`).
        k, v: ``(batch, seq / P, kv_heads, head_dim)``, sharded like ``q``.
        segment_lengths, dilation_rates: the branches, identical on every rank. With contiguous
            shards and the ring/allgather strategies each ``w_i`` must divide the shard length or
            be a multiple of it.
        scale: softmax scale (default ``head_dim ** -0.5``).
        is_causal: causal attention in global positions.
        key_padding_mask: this rank's ``(batch, seq / P)`` bool shard (True = real token),
            sharded like ``q``, or None. Gathered once (``batch * seq / P`` bytes per rank).
        dropout_p: dropout on the attention probabilities; only ``strategy="ulysses"`` (or the
            single-process :func:`dilated.core.functional.dilated_attention`) supports
            ``dropout_p > 0``.
        group: process group (default group when None). Without an initialised process group
            the call runs as a world of one.
        load_balance: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
        strategy: ``"ring"`` (K/V phase rows rotate between neighbours), ``"allgather"``
            (LongNet's algorithm: each rank gets every phase-row block of its segment group at
            once, and key/value gradients are reduce-scattered back to their owners) or
            ``"ulysses"`` (all-to-all over heads: ``heads % P == 0``; every rank runs the
            single-process op on the whole sequence for ``heads / P`` heads).
        timeout_s: seconds any wait of this call (the cross-rank check, every transfer, forward
            and backward) may take before this rank raises :class:`TimeoutError`; None: only
            the process group's own timeout applies.
        return_lse: also return the lse ``(batch, heads, seq / P)`` (float32, float64 for
            float64 inputs).
        check_finite: reject NaN/Inf inputs.

    Returns:
        ``out`` ``(batch, seq / P, heads, head_dim)`` in q's dtype (and ``lse`` with
        ``return_lse``).

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree.
        TimeoutError: when a peer rank does not join a transfer within ``timeout_s``.
    """
    rank, world = group_rank_and_size(group)
    ws_rs_scale: list[object] = []

    def local_checks() -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if timeout_s is not None and not (
            isinstance(timeout_s, (int, float))
            and not isinstance(timeout_s, bool)
            and timeout_s > 0
        ):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        ws, rs, sc = prepare_call(
            q,
            k,
            v,
            segment_lengths,
            dilation_rates,
            scale=scale,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            check_finite_inputs=check_finite,
        )
        seq = q.shape[1] * world
        if strategy == "ulysses":
            check_ulysses_heads(q.shape[2], world)
            chunk_length(seq, world, load_balance)  # validates the sharding
        else:
            if dropout_p != 0.0:
                raise ValueError(
                    f"dropout_p must be 0 for strategy={strategy!r}, got {dropout_p}; dropout "
                    "is supported by strategy='ulysses' and by the single-process "
                    "dilated.core.functional.dilated_attention"
                )
            check_branch_layout(
                ws, rs, q.shape[1], world, chunk_length(seq, world, load_balance), load_balance
            )
        ws_rs_scale.extend([ws, rs, sc])

    options = zlib.crc32(
        repr(
            (
                tuple(segment_lengths),
                tuple(dilation_rates),
                is_causal,
                load_balance,
                scale,
                strategy,
                key_padding_mask is None,
                dropout_p,
                return_lse,
            )
        ).encode()
    )
    if world == 1:
        local_checks()
    else:
        agree_across_ranks(q, k, options, local_checks, group, timeout_s=timeout_s)
    ws, rs, sc = ws_rs_scale
    assert isinstance(ws, tuple) and isinstance(rs, tuple) and isinstance(sc, float)
    comm = RingComm(group, timeout_s)
    if strategy == "ulysses":
        out, maybe_lse = ulysses_attention(
            q,
            k,
            v,
            ws,
            rs,
            scale=sc,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            load_balance=load_balance,
            rank=rank,
            world_size=world,
            comm=comm,
            return_lse=return_lse,
        )
        if return_lse:
            assert maybe_lse is not None
            return out, maybe_lse
        return out
    key_mask = None
    if key_padding_mask is not None:
        key_mask = gather_key_padding_mask(key_padding_mask, load_balance, world, comm)
    plan = RingPlan(
        segment_lengths=ws,
        dilation_rates=rs,
        scale=sc,
        is_causal=is_causal,
        load_balance=load_balance,
        group=group,
        rank=rank,
        world_size=world,
        seq=q.shape[1] * world,
        heads=q.shape[2],
        kv_heads=k.shape[2],
        strategy=strategy,
        timeout_s=timeout_s,
    )
    out, lse = ring_dilated_attention_function(q, k, v, plan, key_mask)
    return (out, lse) if return_lse else out
