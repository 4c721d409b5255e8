# Triton kernels take upper-case pointer names and untyped JIT arguments by convention.
# ruff: noqa: N803
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""[`merge_into`][dilated.core.merge.merge_into] as one Triton launch on strided views (used
through [`dilated.kernels.merge`][dilated.kernels.merge]).

This kernel computes the same formula (``L = logaddexp(L_acc, L_part)``,
``O = exp(L_acc - L) O_acc + exp(L_part - L) O_part``, rows empty on both sides stay ``0`` /
``-inf``) for a block of rows per program, reading the four views in place through their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dilated.kernels.triton_kernels import interpreter_lock

__all__ = ["fused_merge_into", "lse_weights"]


@triton.jit
def lse_weights(lse_acc, lse_new):
    """The weights of the running part and of the new one, and the merged LSE: ``L =
    logaddexp(L_acc, L_new)``, weights ``exp(L_acc - L)`` and ``exp(L_new - L)`` (0, 0 and
    ``-inf`` for rows empty on both sides)."""
    top = tl.maximum(lse_acc, lse_new)
    shift = tl.where(top == float("-inf"), 0.0, top)
    keep = tl.exp(lse_acc - shift)
    take = tl.exp(lse_new - shift)
    total = keep + take
    empty = total == 0.0
    safe = tl.where(empty, 1.0, total)
    return keep / safe, take / safe, tl.where(empty, float("-inf"), shift + tl.log(safe))


@triton.jit
def _merge_rows(
    Acc,
    AccLse,
    Out,
    Lse,
    rows,
    R,
    H,
    D,
    sa_b,
    sa_r,
    sa_h,
    sl_b,
    sl_r,
    sl_h,
    so_b,
    so_r,
    so_h,
    sx_b,
    sx_r,
    sx_h,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FIRST: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    valid = i < rows
    h = i % H
    r = (i // H) % R
    b = i // (H * R)
    if FIRST:
        # Nothing merged into these rows yet: the accumulators are neither read nor needed.
        lse_acc = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    else:
        lse_acc = tl.load(AccLse + b * sl_b + r * sl_r + h * sl_h, mask=valid, other=float("-inf"))
    lse_new = tl.load(Lse + b * sx_b + r * sx_r + h * sx_h, mask=valid, other=float("-inf"))
    keep, take, merged = lse_weights(lse_acc, lse_new)
    d = tl.arange(0, BLOCK_D)
    cols = d[None, :] < D
    both = valid[:, None] & cols
    acc_at = Acc + (b * sa_b + r * sa_r + h * sa_h)[:, None] + d[None, :]
    out_at = Out + (b * so_b + r * so_r + h * so_h)[:, None] + d[None, :]
    out = tl.load(out_at, mask=both, other=0.0).to(tl.float32)
    if FIRST:
        new = out * take[:, None]
    else:
        acc = tl.load(acc_at, mask=both, other=0.0)
        new = acc * keep[:, None] + out * take[:, None]
    tl.store(acc_at, new, mask=both)
    tl.store(AccLse + b * sl_b + r * sl_r + h * sl_h, merged, mask=valid)


def fused_merge_into(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    first: bool = False,
) -> None:
    """[`merge_into`][dilated.core.merge.merge_into] in one launch (same arguments: ``acc_out``
    ``(batch, rows, heads, head_dim)`` float32, ``acc_lse`` ``(batch, heads, rows)`` float32,
    any strides with a unit ``head_dim`` stride; ``out`` like ``acc_out`` in any float dtype,
    ``lse`` like ``acc_lse``). ``first``: the accumulators hold nothing yet (their contents
    are ignored and overwritten)."""
    b, n, h, d = acc_out.shape
    rows = b * n * h
    if rows == 0:
        return
    block_m = 16
    with interpreter_lock():
        _merge_rows[(triton.cdiv(rows, block_m),)](
            acc_out, acc_lse, out, lse, rows, n, h, d,
            acc_out.stride(0), acc_out.stride(1), acc_out.stride(2),
            acc_lse.stride(0), acc_lse.stride(2), acc_lse.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(2), lse.stride(1),
            BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(d), FIRST=first,
        )  # fmt: skip
