"""A catalogue of invalid dilated-attention calls, for every package's hostile-input tests.

Each [`InvalidCall`][dilated.core.testing.invalid.InvalidCall] corrupts one argument of a valid
call and says which argument the error must name.
[`assert_refuses`][dilated.core.testing.invalid.assert_refuses] checks that an implementation
(any callable with the signature of [`dilated_attention`][dilated.core.dilated_attention])
raises a ``ValueError`` or ``TypeError`` naming it, so that every backend and strategy is held to
the same rules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "NOT_BOOLS",
    "NOT_BRANCH_LISTS",
    "InvalidCall",
    "assert_honours_check_finite",
    "assert_refuses",
    "invalid_calls",
]

#: Values that must never be accepted where a bool is expected.
NOT_BOOLS: tuple[Any, ...] = ("false", "no", "True", "", 0, 1, None, 1.0, [True])
#: Values that must never be accepted as ``segment_lengths`` or ``dilation_rates``: unordered
#: collections (their order would pair lengths with the wrong rates), strings, scalars, None.
NOT_BRANCH_LISTS: tuple[Any, ...] = ({4, 8}, {4: 1}, frozenset({4}), "48", b"48", 8, None, 4.0)


@dataclass(frozen=True)
class InvalidCall:
    """One call ``attention(*args, **kwargs)`` that is invalid only in ``argument``."""

    argument: str
    description: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"InvalidCall({self.argument}: {self.description})"


def invalid_calls(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
) -> list[InvalidCall]:
    """Every corruption of the valid call ``(q, k, v, segment_lengths, dilation_rates)``.

    Args:
        q: valid queries ``(batch, seq, heads, head_dim)``, ``head_dim >= 2``.
        k: valid keys ``(batch, seq, kv_heads, head_dim)``.
        v: valid values, shaped like ``k``.
        segment_lengths: a valid branch list for them...
        dilation_rates: ...and its rates.

    Returns:
        One [`InvalidCall`][dilated.core.testing.invalid.InvalidCall] per rule: branch lists,
        booleans, scale, dropout, key padding mask, and the kinds, ranks, dtypes and shapes of
        q, k and v.
    """
    ws, rs = list(segment_lengths), list(dilation_rates)
    b, n = q.shape[0], q.shape[1]
    calls: list[InvalidCall] = []

    def add(argument: str, description: str, *args: Any, **kwargs: Any) -> None:
        calls.append(InvalidCall(argument, description, args, kwargs))

    for bad in NOT_BRANCH_LISTS:
        add("segment_lengths", repr(bad), q, k, v, bad, rs)
        add("dilation_rates", repr(bad), q, k, v, ws, bad)
    add("segment_lengths", "a generator", q, k, v, (w for w in ws), rs)
    add("segment_lengths", "empty", q, k, v, [], [])
    add("segment_lengths", "a zero", q, k, v, [0, *ws[1:]], rs)
    add("segment_lengths", "a bool entry", q, k, v, [True, *ws[1:]], rs)
    add("dilation_rates", "a negative rate", q, k, v, ws, [-1, *rs[1:]])
    add("dilation_rates", "a float rate", q, k, v, ws, [float(rs[0]), *rs[1:]])
    add("dilation_rates", "one rate short", q, k, v, [*ws, ws[-1]], rs)
    add("dilation_rates", "w % r != 0", q, k, v, [ws[0] * 2 + 1, *ws[1:]], [2, *rs[1:]])
    # Beyond MAX_BRANCH_SIZE: 2**62 and 2**63 overflowed int64 index arithmetic.
    add("dilation_rates", "2**62", q, k, v, ws, [*rs[:-1], 2**62])
    add("segment_lengths", "2**63", q, k, v, [*ws[:-1], 2**63], [*rs[:-1], 2**62])
    for name in ("is_causal", "return_lse", "check_finite"):
        for bad in NOT_BOOLS:
            if not (name == "check_finite" and bad is None):  # None: read the environment
                add(name, repr(bad), q, k, v, ws, rs, **{name: bad})
    add("is_causal", "a mask in its slot", q, k, v, ws, rs, is_causal=torch.ones(b, n) > 0)
    for bad in (-1.0, 0.0, float("nan"), float("inf"), "0.5", True):
        add("scale", repr(bad), q, k, v, ws, rs, scale=bad)
    for bad in (1.0, -0.1, "0.1", True):
        add("dropout_p", repr(bad), q, k, v, ws, rs, dropout_p=bad)
    for description, bad in (
        ("a list", [[True] * n] * b),
        ("int64", torch.ones(b, n, dtype=torch.int64)),
        ("float, not 0/-inf", torch.ones(b, n)),
        ("one position too many", torch.ones(b, n + 1, dtype=torch.bool)),
        ("one batch too many", torch.ones(b + 1, n, dtype=torch.bool)),
        ("on another device", torch.ones(b, n, dtype=torch.bool, device="meta")),
        ("a sparse COO tensor", torch.ones(b, n, dtype=torch.bool).to_sparse()),
    ):
        add("key_padding_mask", description, q, k, v, ws, rs, key_padding_mask=bad)
    for name, index in (("q", 0), ("k", 1), ("v", 2)):
        tensors: list[Any] = [q, k, v]
        original = tensors[index]
        for description, bad in (
            ("None", None),
            ("a list", original.tolist()),
            ("rank 3", original[0]),
            ("int64", original.long()),
            (
                "another dtype",
                original.double() if original.dtype != torch.float64 else original.float(),
            ),
            ("another device", original.to("meta")),
            ("a shorter head_dim", original[..., :1]),
            ("a sparse COO tensor", original.to_sparse()),
        ):
            args = list(tensors)
            args[index] = bad
            add(name, description, *args, ws, rs)
    if k.shape[2] >= 2:
        odd = q[:, :, :1].expand(-1, -1, k.shape[2] + 1, -1)
        add("heads", "query heads not a multiple of kv heads", odd, k, v, ws, rs)
    return calls


def assert_refuses(attention: Callable[..., Any], call: InvalidCall) -> None:
    """Assert that ``attention(*call.args, **call.kwargs)`` raises a ``ValueError`` or
    ``TypeError`` whose message names ``call.argument`` (as a whole word).

    Raises:
        AssertionError: it returned, raised another exception, or a message without the name.
    """
    try:
        attention(*call.args, **call.kwargs)
    except (TypeError, ValueError) as err:
        if not re.search(rf"\b{re.escape(call.argument)}\b", str(err)):
            raise AssertionError(
                f"{call!r}: the error does not name {call.argument!r}: {err}"
            ) from err
        return
    except Exception as err:
        raise AssertionError(
            f"{call!r}: raised {type(err).__name__} instead of ValueError/TypeError: {err}"
        ) from err
    raise AssertionError(f"{call!r}: accepted")


def assert_honours_check_finite(
    build: Callable[[bool | None], Callable[..., Any]],
    inputs: Sequence[torch.Tensor],
    nan_inputs: Sequence[torch.Tensor],
) -> None:
    """Assert that a module (or any callable) built by ``build(check_finite)`` honours the flag.

    ``check_finite=True`` computes ``inputs`` and refuses ``nan_inputs`` (which hold a NaN) with
    a ``ValueError`` saying what holds it; ``False`` lets the NaN through even when the
    environment variable ``DILATED_CHECK_FINITE`` is ``1``; None follows that variable; a
    non-bool flag is refused naming ``check_finite``. A module's output may be a tensor or a
    tuple whose first element is one (multi-head layers).

    Raises:
        AssertionError: the flag is not accepted, ignored, or a non-bool flag is not refused.
    """
    from dilated.core.checks import CHECK_FINITE_ENV

    def output(module: Callable[..., Any], args: Sequence[torch.Tensor]) -> torch.Tensor:
        out = module(*args)
        first = out[0] if isinstance(out, tuple) else out
        assert isinstance(first, torch.Tensor), type(first)
        return first

    def refuses(module: Callable[..., Any]) -> bool:
        try:
            output(module, nan_inputs)
        except ValueError as err:
            return "holds NaN or Inf" in str(err)
        return False

    saved = os.environ.pop(CHECK_FINITE_ENV, None)
    try:
        on = build(True)
        assert torch.isfinite(output(on, inputs)).all(), "check_finite=True: finite inputs"
        assert refuses(on), "check_finite=True did not refuse a NaN input"
        assert not refuses(build(None)), "check_finite=None refused with the variable unset"
        os.environ[CHECK_FINITE_ENV] = "1"
        assert refuses(build(None)), f"check_finite=None ignored {CHECK_FINITE_ENV}=1"
        assert torch.isnan(output(build(False), nan_inputs)).any(), (
            f"check_finite=False did not let the NaN through under {CHECK_FINITE_ENV}=1"
        )
    finally:
        os.environ.pop(CHECK_FINITE_ENV, None)
        if saved is not None:
            os.environ[CHECK_FINITE_ENV] = saved
    for bad in ("yes", 1):
        try:
            build(bad)  # type: ignore[arg-type]
        except TypeError as err:
            if "check_finite" not in str(err):
                raise AssertionError(f"check_finite={bad!r}: the error does not name it") from err
        else:
            raise AssertionError(f"check_finite={bad!r} was accepted")
