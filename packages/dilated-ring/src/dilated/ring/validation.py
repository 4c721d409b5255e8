"""Checks of a distributed call that every rank must agree on, done before the first transfer.

A rank that finds its own input bad must not simply raise: the others would wait forever in the
next collective. So every rank runs its local checks, then all ranks exchange one small metadata
tensor (one ``all_gather``), and every rank raises the same ``ValueError`` when any rank's check
failed or the ranks disagree on shapes, dtypes or options.
[`check_call`][dilated.ring.validation.check_call] is that step for one attention call, shared
by every distributed op (dilated-ring's strategies, dilated-sparse's block-sparse op), so that
they refuse the same inputs, read the same environment and agree on the same options.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from dilated.core.functional import prepare_call
from dilated.ring.comm import make_comm

__all__ = [
    "CheckedCall",
    "agree_across_ranks",
    "check_branch_layout",
    "check_call",
    "check_timeout",
]

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_SHAPES = ("batch", "shard_len", "heads", "kv_heads", "head_dim", "dtype")


def check_timeout(timeout_s: object) -> float | None:
    """``timeout_s`` as seconds: None, or a finite positive number (``ValueError`` otherwise)."""
    if timeout_s is None:
        return None
    if (
        not isinstance(timeout_s, (int, float))
        or isinstance(timeout_s, bool)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ValueError(
            f"timeout_s must be None or a finite positive number of seconds, got {timeout_s!r}"
        )
    return float(timeout_s)


def _shape_fields(q: object, k: object) -> list[int]:
    # Bad inputs still give a row of numbers: the exchange must happen whatever a rank holds.
    try:
        if not (isinstance(q, torch.Tensor) and q.dim() == 4):
            return [-1] * len(_SHAPES)
        hkv = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else -1
        dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1
        return [q.shape[0], q.shape[1], q.shape[2], hkv, q.shape[3], dtype]
    except Exception:  # whatever the input is, this rank must still join
        return [-1] * len(_SHAPES)


def _fingerprint(value: object) -> int:
    return zlib.crc32(repr(value).encode())


#: Bytes of a failing rank's error message that travel with the agreement, so that every rank's
#: error names the argument, not only the rank (a multiple of 8: they travel as int64).
_MESSAGE_BYTES = 512


def _encode_message(error: Exception | None) -> list[int]:
    raw = b"" if error is None else str(error).encode("utf-8")[:_MESSAGE_BYTES]
    padded = raw.ljust(_MESSAGE_BYTES, b"\0")
    return torch.frombuffer(bytearray(padded), dtype=torch.int64).tolist()


def _decode_message(row: torch.Tensor) -> str:
    raw = row.contiguous().numpy().tobytes().rstrip(b"\0")
    # A cut in the middle of a character loses that character only.
    return raw.decode("utf-8", errors="ignore")


def agree_across_ranks(
    q: object,
    k: object,
    options: Mapping[str, object],
    local_checks: Callable[[], None],
    group: object,
    *,
    timeout_s: float | None = None,
) -> None:
    """Run ``local_checks`` here and make every rank raise if any rank's checks fail or disagree.

    Args:
        q, k: this rank's shards (only their shapes and dtypes are exchanged; anything else is
            exchanged as "no shape", so a rank with a bad argument still joins).
        options: the call's options by name; every rank must pass equal values, and a
            mismatch names the option.
        local_checks: raises ``ValueError``/``TypeError`` for a bad local input. Any exception
            it raises is held until every rank has joined the exchange, so a failing rank never
            leaves the others waiting.
        group: process group (None: default) or a
            [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup].
        timeout_s: raise [`TimeoutError`][TimeoutError] when a peer has not joined the exchange
            within this many seconds (None: the process group's timeout).
    """
    error: Exception | None = None
    try:
        local_checks()
    except Exception as exc:  # re-raised below, once every rank knows this one failed
        error = exc
    comm = make_comm(group, timeout_s)
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    names = list(options)
    mine = torch.tensor(
        [
            int(error is not None),
            *_shape_fields(q, k),
            *(_fingerprint(options[n]) for n in names),
            *_encode_message(error),
        ],
        dtype=torch.int64,
    )
    try:
        gathered = comm.all_gather(mine.to(comm.device_for(q)), counted=False)
    except TimeoutError as exc:
        raise TimeoutError(f"the cross-rank input check (rank {comm.rank}): {exc}") from exc
    rows = torch.stack([g.cpu() for g in gathered])
    if error is not None:
        if isinstance(error, (ValueError, TypeError)):
            raise type(error)(f"rank {comm.rank}: {error}") from error
        raise error
    bad = [i for i in range(comm.world_size) if rows[i, 0] != 0]
    if bad:
        first = _decode_message(rows[bad[0], -_MESSAGE_BYTES // 8 :])
        raise ValueError(f"invalid input on rank(s) {bad}; rank {bad[0]}: {first}")
    for col, name in enumerate([*_SHAPES, *names], start=1):
        values = rows[:, col].tolist()
        if len(set(values)) > 1:
            if col <= len(_SHAPES):
                shown = [_DTYPES[x] if name == "dtype" and x >= 0 else x for x in values]
                raise ValueError(
                    f"every rank must pass shards of one {name}, got {shown} on ranks "
                    f"0..{comm.world_size - 1}"
                )
            differ = [i for i, x in enumerate(values) if x != values[comm.rank]]
            raise ValueError(
                f"option {name!r} differs between ranks: this rank (rank {comm.rank}) has "
                f"{options[name]!r}, rank(s) {differ} another value; every rank must pass the "
                "same options"
            )


def check_branch_layout(
    segment_lengths: Sequence[int],
    shard_len: int,
    world_size: int,
    chunk_len: int,
    mode: str,
) -> None:
    """Raise unless every branch either fits in a chunk or spans whole shards.

    A world of one takes any branch. Contiguous shards: a segment must lie inside one shard (``shard_len % w == 0``), cover whole
    shards (``w % shard_len == 0``) or the whole sequence. Zigzag and striped shards accept any
    branch (a spanning branch rotates over every rank).
    """
    seq = shard_len * world_size
    for i, w in enumerate(segment_lengths):
        if world_size == 1 or chunk_len % w == 0 or w >= seq:
            continue
        if mode == "contiguous" and w % shard_len != 0:
            raise ValueError(
                f"segment_lengths[{i}] = {w} does not split evenly over the ranks it spans: with "
                f"shards of {shard_len} tokens ({world_size} ranks, {seq} tokens) a segment must "
                f"divide the shard length or be a multiple of it"
            )


@dataclass(frozen=True)
class CheckedCall:
    """What [`check_call`][dilated.ring.validation.check_call] returns: the branches as tuples of
    ints, the softmax scale and the timeout, all checked (and equal on every rank), and this
    rank's key mask in the internal form (bool, True = a key that may be attended; None without
    a ``key_padding_mask``), converted once by
    [`prepare_call`][dilated.core.functional.prepare_call]."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    scale: float
    timeout_s: float | None
    key_mask: torch.Tensor | None = None


def _option(values: object) -> object:
    # Any value, even a bad one, must give the same fingerprint on every rank that passed it.
    return tuple(values) if isinstance(values, (list, tuple, range)) else values


def check_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    return_lse: bool,
    check_finite: bool | None,
    group: object,
    world_size: int,
    timeout_s: float | None,
    options: Mapping[str, object] | None = None,
    checks: Callable[[CheckedCall], None] | None = None,
) -> CheckedCall:
    """Check one distributed attention call on this rank, inside one cross-rank agreement.

    The local checks are those of every single-process op
    ([`prepare_call`][dilated.core.functional.prepare_call]: tensors, branches, booleans, scale,
    dropout, key padding mask, and NaN/Inf when ``check_finite`` or ``DILATED_CHECK_FINITE``
    says so), ``timeout_s`` ([`check_timeout`][dilated.ring.validation.check_timeout]) and
    ``checks`` (the op's own, given the checked call). They run inside
    [`agree_across_ranks`][dilated.ring.validation.agree_across_ranks] with the call's options
    (branches, ``is_causal``, ``scale``, mask presence, ``dropout_p``, ``return_lse``) and the op's
    ``options``, so a bad argument or a disagreement on any rank makes every rank raise at once.
    A world of one, or a ``torch.compile`` trace, runs the local checks only. The arguments
    not listed below are the call's (``segment_lengths`` ... ``check_finite``), as given.

    Args:
        q, k, v: this rank's shards ``(batch, seq / P, heads | kv_heads, head_dim)``.
        group: the process group (None: default) or a loopback group.
        world_size: its size.
        timeout_s: the call's bound of every wait (None, or finite and positive).
        options: more values every rank must pass equal, by name (a mismatch names it).
        checks: more local checks; they raise ``ValueError``/``TypeError`` naming the argument.

    Returns:
        The [`CheckedCall`][dilated.ring.validation.CheckedCall].

    Raises:
        ValueError: on every rank, when any rank's input is invalid or the ranks disagree.
        TimeoutError: a peer did not join the agreement within ``timeout_s``.
    """
    timeout_error: ValueError | None = None
    try:
        timeout = check_timeout(timeout_s)
    except ValueError as exc:
        # Join the agreement anyway (with no bound of its own), so no peer waits for this rank.
        timeout, timeout_error = None, exc
    checked: list[CheckedCall] = []

    def local_checks() -> None:
        if timeout_error is not None:
            raise timeout_error
        ws, rs, softmax_scale, key_mask = prepare_call(
            q,
            k,
            v,
            segment_lengths,
            dilation_rates,
            scale=scale,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            check_finite_inputs=check_finite,
            is_causal=is_causal,
            return_lse=return_lse,
        )
        call = CheckedCall(ws, rs, softmax_scale, timeout, key_mask)
        if checks is not None:
            checks(call)
        checked.append(call)

    if world_size == 1 or torch.compiler.is_compiling():
        # A compiled call keeps its local checks; the cross-rank exchange (a collective and a
        # host read) stays in eager mode, where shapes are not already fixed by the graph.
        local_checks()
    else:
        every = {
            "segment_lengths": _option(segment_lengths),
            "dilation_rates": _option(dilation_rates),
            "is_causal": is_causal,
            "scale": scale,
            "key_padding_mask given": key_padding_mask is not None,
            "dropout_p": dropout_p,
            "return_lse": return_lse,
            **(options or {}),
        }
        agree_across_ranks(q, k, every, local_checks, group, timeout_s=timeout)
    return checked[0]
