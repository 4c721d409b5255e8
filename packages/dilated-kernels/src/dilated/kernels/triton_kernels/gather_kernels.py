# Triton kernels take upper-case pointer names and untyped JIT arguments by convention.
# ruff: noqa: N803
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels that gather per-sub-problem results back into ``(batch, seq, heads, head_dim)``.

The ``"cudnn"`` backend computes every (branch, phase, segment run) as one dense attention call
on a strided view; each call returns its own compact tensor. These kernels read all of them for a
block of output rows in one pass, so the output is written once:

``gather_pieces`` with ``MERGE``: the LSE merge of the docs' Concepts page (online over branches, float32),
writing ``out`` and the merged ``lse`` ``(batch, heads, seq)``; without: the plain sum (gradients
of q, k and v, each branch's share added in float32).

Where each piece lives is given by a table of int64 rows, one per (branch, phase, batch, full or
partial segment): the byte addresses of the piece's values and LSE and their element strides
(see [`dilated.kernels.backends.cudnn`][dilated.kernels.backends.cudnn]); the branches ``WS``/``RS`` are compile-time
constants. Addresses are turned into typed pointers in the
kernel, which is what lets one launch read a variable number of separately allocated tensors.
With ``SCALAR`` (every ``w_i`` a multiple of ``BLOCK_T``) a block of rows lies in one segment of
every branch, so each program reads one table row per branch instead of one per row.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: int64 fields per table row: value address, lse address, 3 value strides (segment, row,
#: head), 3 lse strides (segment, row, head), first segment index.
ROW_FIELDS: tl.constexpr = tl.constexpr(9)


@triton.jit
def _field(Table, row, k, take, SCALAR: tl.constexpr):
    # A constexpr ternary: only the taken branch is compiled (a masked load of a scalar is not).
    return tl.load(Table + row + k) if SCALAR else tl.load(Table + row + k, mask=take, other=0)


@triton.jit
def _piece_pointers(
    Table,
    t,
    t_first,
    j,
    bi,
    n,
    B,
    valid,
    i,
    DTYPE: tl.constexpr,
    WS: tl.constexpr,
    RS: tl.constexpr,
    RMAX: tl.constexpr,
    SCALAR: tl.constexpr,
    WITH_LSE: tl.constexpr,
    KV_GROUP: tl.constexpr,
):
    """Pointers to branch ``i``'s value row (and LSE) for positions ``t`` of head ``j``."""
    # Constant w and r turn every division and modulo below into multiplies and shifts.
    w: tl.constexpr = WS[i]
    r: tl.constexpr = RS[i]
    if KV_GROUP == 0:
        # Query head j is read by phase j % r only, at the rows of that phase.
        p = j % r
        take = valid & ((t % r) == p)
        hl = j // r
    else:
        # Key/value head j: a row's phase is its position mod r, and that phase's piece holds
        # head j either always (the group is a multiple of r) or when j falls in its strided
        # set (r a multiple of the group); see cudnn._kv_heads.
        p = t % r
        if KV_GROUP % r == 0:
            take = valid
            hl = j
        else:
            step: tl.constexpr = r // KV_GROUP
            take = valid & ((j % step) == (p // KV_GROUP))
            hl = j // step
        p = tl.where(take, p, 0)
    seg = t // w
    # SCALAR: the whole block is in the segment of its first row.
    where = t_first // w if SCALAR else seg
    partial = (where == n // w).to(tl.int64)
    row = ((((i * RMAX + p) * B + bi) * 2 + partial) * ROW_FIELDS).to(tl.int64)
    local_seg = where - _field(Table, row, 8, take, SCALAR)
    local_row = (t - seg * w - p) // r
    o_off = (
        local_seg * _field(Table, row, 2, take, SCALAR)
        + local_row * _field(Table, row, 3, take, SCALAR)
        + hl * _field(Table, row, 4, take, SCALAR)
    )
    # Every piece address and row offset is a multiple of 16 bytes (head_dim % 8 == 0, as
    # cuDNN requires); saying so lets each row be read with 16-byte vector loads.
    o_ptr = tl.multiple_of(
        _field(Table, row, 0, take, SCALAR).to(tl.pointer_type(DTYPE)) + o_off, 16
    )
    if WITH_LSE:
        l_off = (
            local_seg * _field(Table, row, 5, take, SCALAR)
            + local_row * _field(Table, row, 6, take, SCALAR)
            + hl * _field(Table, row, 7, take, SCALAR)
        )
        l_ptr = _field(Table, row, 1, take, SCALAR).to(tl.pointer_type(tl.float32)) + l_off
    else:
        l_ptr = o_ptr
    return o_ptr, l_ptr, take


@triton.jit
def gather_pieces(
    Table,
    Out,
    Lse,
    t_start,
    t_stop,
    n,
    B,
    H,
    sob,
    son,
    soh,
    slb,
    slh,
    MERGE: tl.constexpr,
    WS: tl.constexpr,
    RS: tl.constexpr,
    RMAX: tl.constexpr,
    SCALAR: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    KV_GROUP: tl.constexpr,
    ACCUMULATE: tl.constexpr = False,
):
    """Rows ``[t_start, t_stop)`` of ``Out``: the LSE merge of the pieces (``MERGE``, also
    writing ``Lse``) or their plain sum (``Lse`` unused), added to what ``Out`` holds with
    ``ACCUMULATE`` (sum only). ``H`` heads of query heads (``KV_GROUP`` 0) or of key/value
    heads shared by ``KV_GROUP`` query heads."""
    # Heads vary fastest over programs, so programs running together write whole output rows.
    pid_bh = tl.program_id(0)
    bi = pid_bh // H
    j = pid_bh % H
    t_first = t_start + tl.program_id(1) * BLOCK_T
    t = t_first + tl.arange(0, BLOCK_T)
    valid = t < t_stop
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    # int64: seq * heads * head_dim passes 2**31 from about 1M tokens.
    t64 = t.to(tl.int64)
    o_ptrs = Out + bi.to(tl.int64) * sob + t64[:, None] * son + j * soh + dd[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    for i in tl.static_range(len(WS)):
        o_ptr, l_ptr, take = _piece_pointers(
            Table, t, t_first, j, bi, n, B, valid, i,
            Out.dtype.element_ty, WS, RS, RMAX, SCALAR, MERGE, KV_GROUP,
        )  # fmt: skip
        o_i = tl.load(o_ptr[:, None] + dd[None, :], mask=take[:, None] & dmask[None, :], other=0.0)
        if MERGE:
            lse_i = tl.load(l_ptr, mask=take, other=float("-inf"))
            m_new = tl.maximum(m, lse_i)
            # Rows no branch has reached yet keep m = -inf; shifting by 0 keeps exp() NaN-free.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            beta = tl.exp(lse_i - shift)
            acc = acc * alpha[:, None] + beta[:, None] * o_i.to(tl.float32)
            denom = denom * alpha + beta
            m = m_new
        else:
            acc += o_i.to(tl.float32)
    if MERGE:
        covered = denom > 0
        acc = acc * tl.where(covered, 1.0 / tl.where(covered, denom, 1.0), 0.0)[:, None]
        lse = tl.where(covered, m + tl.log(tl.where(covered, denom, 1.0)), float("-inf"))
        tl.store(Lse + bi.to(tl.int64) * slb + j * slh + t64, lse, mask=valid)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=valid[:, None] & dmask[None, :])
