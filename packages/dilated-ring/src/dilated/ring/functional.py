"""The public functional op of dilated-ring: checks on every rank, then the chosen strategy."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from dilated.ring.comm import group_key, make_comm
from dilated.ring.loopback import LoopbackGroup
from dilated.ring.op import ring_attention
from dilated.ring.schedules import SCHEDULES
from dilated.ring.sharding import chunk_length
from dilated.ring.ulysses import check_ulysses_heads, ulysses_attention
from dilated.ring.validation import CheckedCall, check_branch_layout, check_call

__all__ = ["as_process_group", "group_rank_and_size", "ring_dilated_attention"]

_STRATEGIES = (*SCHEDULES, "ulysses")


def as_process_group(group: object) -> Any:
    """``group`` as the ring uses it: a 1-D ``DeviceMesh`` (torchtitan's context-parallel mesh,
    or one dimension of a larger mesh, ``mesh["cp"]``) becomes its process group; a process
    group, a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup] or None is returned as is.

    Raises:
        ValueError: a ``DeviceMesh`` of more than one dimension (name the dimension the sequence
            is split over: ``mesh["cp"]``).
    """
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    if mesh_module is None or not isinstance(group, mesh_module.DeviceMesh):
        return group  # no DeviceMesh can exist before its module is imported
    if group.ndim != 1:
        names = group.mesh_dim_names or ()
        raise ValueError(
            f"group: a DeviceMesh must be 1-D (the ranks the sequence is split over), got "
            f"{group.ndim} dimensions {names}: pass one of them, mesh[name]"
        )
    return group.get_group()


def group_rank_and_size(group: object) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (a process group, None for the default one, a 1-D
    ``DeviceMesh``, or a [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]); ``(0, 1)``
    when torch.distributed is not initialised."""
    group = as_process_group(group)
    if isinstance(group, LoopbackGroup):
        return group.rank, group.world_size
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)  # type: ignore[arg-type]


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
    group: Any = None,
    load_balance: str = "contiguous",
    strategy: str = "ring",
    timeout_s: float | None = None,
    return_lse: bool = False,
    check_finite: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention (the docs' Concepts page) of a sequence sharded over the ranks of ``group``.

    Every rank calls it with its shard; the result is this rank's rows of the single-process
    result on the whole sequence.

    Args:
        q: this rank's queries ``(batch, seq / P, heads, head_dim)``, sharded as ``load_balance``
            says (see [`dilated.ring.sharding`][dilated.ring.sharding]).
        k, v: ``(batch, seq / P, kv_heads, head_dim)``, sharded like ``q``.
        segment_lengths, dilation_rates: the branches, identical on every rank. With contiguous
            shards and the ring/allgather strategies each ``w_i`` must divide the shard length or
            be a multiple of it.
        scale: softmax scale (default ``head_dim ** -0.5``).
        is_causal: causal attention in global positions.
        key_padding_mask: this rank's ``(batch, seq / P)`` shard in PyTorch's convention (bool True or float ``-inf`` = ignored),
            sharded like ``q``, or None. Gathered once (``batch * seq / P`` bytes per rank).
        dropout_p: dropout on the attention probabilities (every strategy). The masks are drawn
            per dense call from a seed taken from torch's default generator, so a call is
            reproducible under ``torch.manual_seed`` but its masks differ from those of the
            single-process op.
        group: process group (default group when None), a 1-D ``DeviceMesh`` (see
            [`as_process_group`][dilated.ring.functional.as_process_group]), or a
            [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup] (every rank in one process).
            Without an initialised process group the call runs as a world of one.
        load_balance: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
        strategy: ``"ring"`` (K/V phase rows rotate between neighbours), ``"allgather"``
            (LongNet's algorithm: each rank gets every phase-row block of its segment group at
            once, and key/value gradients are reduce-scattered back to their owners) or
            ``"ulysses"`` (all-to-all over heads: ``heads % P == 0``; every rank runs the
            single-process op on the whole sequence for ``heads / P`` heads).
        timeout_s: seconds any wait of this call (the cross-rank check, every transfer, forward
            and backward) may take before this rank raises [`TimeoutError`][TimeoutError];
            None: only the process group's own timeout applies.
        return_lse: also return the lse ``(batch, heads, seq / P)`` (float32, float64 for
            float64 inputs).
        check_finite: reject NaN/Inf inputs (a device-to-host sync); None reads the environment
            variable ``DILATED_CHECK_FINITE`` (off unless ``1``/``true``).

    Returns:
        ``out`` ``(batch, seq / P, heads, head_dim)`` in q's dtype (and ``lse`` with
        ``return_lse``).

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree (the
            message names the argument or option).
        TimeoutError: when a peer rank does not join a transfer within ``timeout_s``.
    """
    group = as_process_group(group)
    rank, world = group_rank_and_size(group)

    def strategy_checks(call: CheckedCall) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        seq = q.shape[1] * world
        if strategy == "ulysses":
            check_ulysses_heads(q.shape[2], world)
            chunk_length(seq, world, load_balance)  # validates the sharding
        else:
            check_branch_layout(
                call.segment_lengths,
                q.shape[1],
                world,
                chunk_length(seq, world, load_balance),
                load_balance,
            )

    call = check_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        return_lse=return_lse,
        check_finite=check_finite,
        group=group,
        world_size=world,
        timeout_s=timeout_s,
        options={"load_balance": load_balance, "strategy": strategy},
        checks=strategy_checks,
    )
    ws, rs, sc, timeout = call.segment_lengths, call.dilation_rates, call.scale, call.timeout_s
    if strategy == "ulysses":
        out, maybe_lse = ulysses_attention(
            q,
            k,
            v,
            ws,
            rs,
            scale=sc,
            is_causal=is_causal,
            key_padding_mask=call.key_mask,
            dropout_p=dropout_p,
            load_balance=load_balance,
            rank=rank,
            world_size=world,
            comm=make_comm(group, timeout),
            return_lse=return_lse,
        )
        if return_lse:
            assert maybe_lse is not None
            return out, maybe_lse
        return out
    out, lse = ring_attention(
        q,
        k,
        v,
        ws,
        rs,
        scale=sc,
        is_causal=is_causal,
        key_padding_mask=call.key_mask,
        dropout_p=dropout_p,
        load_balance=load_balance,
        strategy=strategy,
        group=group_key(group),
        rank=rank,
        world_size=world,
        timeout_s=timeout,
    )
    return (out, lse) if return_lse else out
