"""Every validation rule of dilated attention, in one place.

Each check raises `ValueError` (or [`ArgumentTypeError`][dilated.core.checks.ArgumentTypeError],
a `TypeError`, for a wrong kind of object) whose message names the argument, the offending
value and the rule it breaks. Implementations in every ``dilated`` package call these functions
instead of writing their own checks.

Shape, dtype, device and type checks are always on; they read no tensor element, so they cost no
device sync and work on meta tensors and under ``torch.func`` transforms. The one value check,
NaN/Inf in the inputs, is opt-in: see [`resolve_check_finite`][dilated.core.checks.resolve_check_finite].
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

# Importable here as before; it guards gradients, checks no argument.
from dilated.core.gradients import first_derivative_only as first_derivative_only

__all__ = [
    "CHECK_FINITE_ENV",
    "MAX_BRANCH_SIZE",
    "ArgumentTypeError",
    "check_attention_inputs",
    "check_bool",
    "check_branch_list",
    "check_branches",
    "check_cu_seqlens",
    "check_dropout",
    "check_finite",
    "check_index",
    "check_instance",
    "check_key_padding_mask",
    "check_optional_bool",
    "check_positive_int",
    "check_positive_number",
    "check_scale",
    "parse_env_flag",
    "resolve_check_finite",
]

#: Environment variable read when ``check_finite`` is None: ``1``/``true``/``yes``/``on`` turn
#: the NaN/Inf input check on, ``0``/``false``/``no``/``off`` or unset leave it off.
CHECK_FINITE_ENV = "DILATED_CHECK_FINITE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: The largest segment length or dilation rate, ``2**40``. No sequence comes near it, and a
#: segment at least as long as the sequence is one segment, so a larger value could change no
#: result; bounding it keeps every index computed from it (a size times a stride) inside int64,
#: where ``2**62`` or ``2**63`` overflowed into errors that named neither the argument nor a rule.
MAX_BRANCH_SIZE = 2**40


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a string where a bool is expected, a set of branches...).

    A `TypeError`, and also a `ValueError` so that ``except ValueError`` written
    against earlier versions, which raised ``ValueError`` for these, still catches it.
    """


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; anything else (``"false"``, ``0``, a tensor) raises.

    Strings are never read as booleans: ``"false"`` is truthy, so accepting it would silently do
    the opposite of what was asked.

    Raises:
        ArgumentTypeError: ``value`` is not a bool; the message names ``name``.
    """
    if isinstance(value, bool):
        return value
    hint = ""
    if isinstance(value, torch.Tensor):
        hint = " (a mask goes to key_padding_mask=..., by keyword)"
    elif isinstance(value, str):
        hint = " (strings are not read as booleans)"
    raise ArgumentTypeError(f"{name} must be a bool (True or False), got {_kind(value)}{hint}")


def check_instance(name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    """Raise unless ``value`` is an instance of ``types``; ``what`` says what ``name`` must be.

    Raises:
        ArgumentTypeError: ``"{name} must be {what}, got {its type and value}"``.
    """
    if not isinstance(value, types):
        raise ArgumentTypeError(f"{name} must be {what}, got {_kind(value)}")


def check_optional_bool(name: str, value: Any) -> bool | None:
    """Return ``value`` if it is a ``bool`` or None (see [`check_bool`][dilated.core.checks.check_bool])."""
    return None if value is None else check_bool(name, value)


def resolve_check_finite(check_finite: bool | None) -> bool:
    """Whether the NaN/Inf input check runs: ``check_finite`` itself, or, when it is None, the
    environment variable ``DILATED_CHECK_FINITE`` (``1``/``true``/``yes``/``on``; off when unset).

    The check is off by default because it reads every element of q, k and v and waits for the
    device; every other check reads only shapes and stays on.

    Raises:
        ArgumentTypeError: ``check_finite`` is neither a bool nor None.
        ValueError: the environment variable holds something other than the values above.
    """
    if check_finite is not None:
        return check_bool("check_finite", check_finite)
    return parse_env_flag(CHECK_FINITE_ENV, os.environ.get(CHECK_FINITE_ENV, "")) is True


def parse_env_flag(variable: str, raw: str, *, auto: bool = False) -> bool | None:
    """An environment variable's value ``raw`` as a switch (any case and spacing): True for
    ``1``/``true``/``yes``/``on``, False for ``0``/``false``/``no``/``off``, None for empty (the
    caller's default) and, when ``auto`` allows it, ``auto``; ``ValueError`` naming it otherwise."""
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    if word == "" or (auto and word == "auto"):
        return None
    choices = f"{', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off){', or auto' if auto else ''}"
    raise ValueError(f"environment variable {variable}={raw!r} must be one of {choices}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def check_positive_number(name: str, value: Any, *, unit: str = "", or_none: bool = False) -> float:
    """Return ``value`` as a ``float`` if it is a finite positive real number.

    Rule: an ``int`` or ``float`` (not a bool, not a string such as ``"10000"``), neither NaN
    nor infinite, above 0. Infinity is refused because every use of these numbers (a softmax
    scale, a RoPE base, an epsilon, a timeout) would silently degenerate with it.

    Args:
        name: the argument, named in the message.
        value: what was given.
        unit: appended to the rule in the message (``" of seconds"``).
        or_none: the caller also accepts None (said in the message; None itself is the
            caller's to handle).

    Raises:
        ArgumentTypeError: not an int or float; ValueError: NaN, infinite, or not above 0.
    """
    rule = f"{name} must be a finite positive number{unit}{' or None' if or_none else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{rule}, got {_kind(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{rule}, got {value!r}")
    return float(value)


def check_index(name: str, value: Any, size: int, what: str) -> int:
    """Return ``value`` if it is an ``int`` in ``[0, size)``; ``what`` says what bounds it.

    Raises:
        ValueError: not an int (a bool or a float included), or outside ``[0, size)``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an integer in [0, {size}) ({what}), got {value!r}")
    return value


def check_branch_list(name: str, value: Any) -> tuple[int, ...]:
    """Return one branch list (``segment_lengths`` or ``dilation_rates``) as a tuple of ints.

    Rule: an ordered sequence (list, tuple, range) of positive integers at most
    ``MAX_BRANCH_SIZE`` (``2**40``), one per branch, and not empty.
    Sets and dicts are refused (their order pairs segment lengths with the wrong rates), so are
    strings, generators, single ints and None.

    Raises:
        ArgumentTypeError: not a sequence.
        ValueError: empty, or holding an entry that is not a positive integer or is above
            ``MAX_BRANCH_SIZE``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ArgumentTypeError(
            f"{name} must be a sequence of positive integers (a list or tuple, one entry per "
            f"branch, in branch order), got {_kind(value)}"
        )
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty: dilated attention needs at least one branch")
    entries = tuple(check_positive_int(f"{name}[{i}]", x) for i, x in enumerate(value))
    for i, x in enumerate(entries):
        if x > MAX_BRANCH_SIZE:
            raise ValueError(
                f"{name}[{i}]={x} must be at most 2**40 = {MAX_BRANCH_SIZE}, the largest segment "
                "length or dilation rate (no sequence is that long, and a segment at least as "
                "long as the sequence is one segment: the sequence length gives the same result)"
            )
    return entries


def check_branches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate one branch list and return it as two tuples of ints.

    Rules: both pass [`check_branch_list`][dilated.core.checks.check_branch_list], they have
    equal length, and every segment length is a multiple of its dilation rate (``w_i % r_i == 0``).
    Lists or tuples of plain ints that passed once are looked up, not checked again (every
    layer of every decoding step passes the same ones).
    """
    if type(segment_lengths) in _PLAIN and type(dilation_rates) in _PLAIN:
        ws_, rs_ = tuple(segment_lengths), tuple(dilation_rates)
        # Only exact ints: True == 1 would otherwise find the entry of 1.
        if all(type(x) is int for x in ws_ + rs_) and (ws_, rs_) in _CHECKED_BRANCHES:
            return ws_, rs_
    checked = _check_branches(segment_lengths, dilation_rates)
    if len(_CHECKED_BRANCHES) < 256 and all(type(x) is int for x in checked[0] + checked[1]):
        _CHECKED_BRANCHES.add(checked)
    return checked


_PLAIN = (list, tuple)
#: Branch lists that passed (bounded: a program uses a few).
_CHECKED_BRANCHES: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()


def _check_branches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for name, seq in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or len(seq) == 0:
            check_branch_list(name, seq)  # raises, naming the rule
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length (one dilation rate per "
            f"segment length), got {len(segment_lengths)} and {len(dilation_rates)}"
        )
    ws = check_branch_list("segment_lengths", segment_lengths)
    rs = check_branch_list("dilation_rates", dilation_rates)
    for i, (w, r) in enumerate(zip(ws, rs)):
        if w % r != 0:
            raise ValueError(
                f"segment_lengths[{i}]={w} must be a multiple of dilation_rates[{i}]={r} "
                "(w % r == 0)"
            )
    return ws, rs


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` if given (finite and positive), else ``head_dim**-0.5``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_positive_number("scale", scale, or_none=True)


def check_dropout(name: str, p: float) -> float:
    """Return ``p`` if it is a probability in ``[0, 1)``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decoding: bool = False
) -> None:
    """Check the ``(batch, seq, heads, head_dim)`` inputs of one dilated-attention call.

    Rules: dense (strided) tensors of rank 4, not sparse or nested; equal batch, seq and
    head_dim; ``k`` and ``v`` of one shape; query heads a multiple of key/value heads
    (grouped-query attention); one floating dtype and one device.

    Args:
        q, k, v: the call's tensors.
        decoding: ``q`` is one query row ``(batch, 1, heads, head_dim)`` over all of ``k``'s
            positions (a decoding step over a KV cache), so its seq is 1 instead of ``k``'s.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_nested:
            # Every implementation indexes q, k and v through strided views.
            layout = "nested" if t.is_nested else t.layout
            raise ValueError(
                f"{name} must be a dense tensor (layout torch.strided), got layout {layout}: "
                "call .to_dense() first"
            )
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4, (batch, seq, heads, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, n, hq, d = q.shape
    if decoding:
        if n != 1 or k.shape[0] != b or k.shape[3] != d:
            raise ValueError(
                "a decoding step takes q of shape (batch, 1, heads, head_dim) with the batch and "
                f"head_dim of k, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
    elif k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
        raise ValueError(
            "q and k must agree in batch, seq and head_dim (dims 0, 1, 3), got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if any(s == 0 for s in (*q.shape, *k.shape)):
        raise ValueError(
            f"q, k and v must not have an empty dimension, got q {tuple(q.shape)} and k "
            f"{tuple(k.shape)}"
        )
    hkv = k.shape[2]
    if hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for grouped-query "
            "attention"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )


def check_key_padding_mask(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Check a ``(batch, seq)`` ``key_padding_mask`` against ``q``; return the keys that may be seen.

    PyTorch's convention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``): a bool
    mask is True at the keys to *ignore* (padding); a float mask is ``-inf`` at the keys to
    ignore and ``0`` at the others. Any other float value (an additive bias, which torch would
    add to the scores) or NaN raises ``ValueError``: dilated attention takes no bias.

    This is the one place the public convention is read. The result is the internal form every
    kernel takes: bool ``(batch, seq)``, True at a key that may be attended (None stays None).
    A row whose keys are all ignored is allowed: its queries get ``out = 0``, ``lse = -inf``
    and zero gradients (see the docs' Errors page).

    Args:
        mask: None, bool ``(batch, seq)`` (True = ignored) or floating ``(batch, seq)``
            (``-inf`` = ignored, ``0`` = attended), on ``q``'s device.
        q: the tensor whose ``(batch, seq)`` the mask covers: the queries of a self-attention
            call (whose keys have the same two sizes), the keys of a decoding step.

    Returns:
        None, or bool ``(batch, seq)``: True where a key may be attended (``~mask``).

    Raises:
        ArgumentTypeError: ``mask`` is not a tensor.
        ValueError: wrong layout, dtype, shape or device, or a float value other than 0/-inf.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ArgumentTypeError(
            f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}"
        )
    if mask.layout != torch.strided or mask.is_nested:
        raise ValueError(
            "key_padding_mask must be a dense tensor (layout torch.strided), got layout "
            f"{'nested' if mask.is_nested else mask.layout}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            "key_padding_mask must be a bool tensor (True = padding, ignored) or a float tensor "
            f"(-inf = ignored, 0 = attended), as in torch.nn.MultiheadAttention; got {mask.dtype}"
        )
    if tuple(mask.shape) != (q.shape[0], q.shape[1]):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seq) = {(q.shape[0], q.shape[1])}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on {q.device}, got {mask.device}")
    if mask.dtype == torch.bool:
        return ~mask
    attended = mask == 0
    # A float mask costs one device sync for this check; a bool mask costs none.
    if not bool((attended | (mask == float("-inf"))).all()):
        raise ValueError(
            "a float key_padding_mask must hold only -inf (ignored key) and 0 (attended key); "
            "dilated attention takes no additive bias. Pass a bool mask (True = padding) instead"
        )
    return attended


def check_cu_seqlens(cu_seqlens: object, q: torch.Tensor) -> tuple[int, ...]:
    """Return the boundaries of a packed batch as ints (flash-attn's ``cu_seqlens``).

    Rule: a 1-D integer tensor (any device; a CUDA tensor costs one device synchronisation to
    read, so pass a CPU tensor or a list where it matters) or a sequence of ints, of shape
    ``(num_sequences + 1,)``: ``0``, then non-decreasing, ending at ``seq``; sequence ``i`` is
    rows ``cu_seqlens[i]:cu_seqlens[i + 1]``. ``q`` ``(1, seq, heads, head_dim)``: the sequences
    are packed along ``seq`` of a batch of one.

    Raises:
        ArgumentTypeError: not an integer tensor or a sequence of ints.
        ValueError: another shape, a batch of ``q`` other than 1, or boundaries that do not
            start at 0, decrease, or do not end at ``seq``.
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex():
            raise ValueError(
                "cu_seqlens must be a 1-D integer tensor (num_sequences + 1,), got "
                f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
            )
        bounds = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in cu_seqlens):
            raise ArgumentTypeError("cu_seqlens must hold ints (the sequences' start rows)")
        bounds = list(cu_seqlens)
    else:
        raise ArgumentTypeError(
            "cu_seqlens must be a 1-D integer tensor or a sequence of ints, got "
            f"{type(cu_seqlens).__name__}"
        )
    seq = q.shape[1]
    if q.shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens the sequences are packed along seq of a batch of one: q must be "
            f"(1, total, heads, head_dim), got batch {q.shape[0]}"
        )
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seq={seq} (num_sequences + 1 entries), "
            f"got {bounds[:4]}{'...' if len(bounds) > 4 else ''} ending at {bounds[-1] if bounds else None}"
        )
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return tuple(bounds)


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or Inf.

    This reads every element and synchronises with the device, which is why callers run it only
    when [`resolve_check_finite`][dilated.core.checks.resolve_check_finite] says so. It is skipped
    while ``torch.compile`` traces (data-dependent errors cannot be raised there) and for meta
    tensors (which hold no values).
    """
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t.device.type == "meta":
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} holds NaN or Inf values; dilated attention needs finite inputs "
                "(check_finite=False, or DILATED_CHECK_FINITE unset, lets them propagate as "
                "in dense attention)"
            )
