# Triton kernels take upper-case pointer names and untyped JIT arguments by convention.
# ruff: noqa: N803
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Triton kernels of the ``"triton"`` backend: one branch per launch, LSE-merged accumulators.

Layout: q/k/v ``(batch, seq, heads, head_dim)`` read in place. Grid: (row block, segment,
batch * head); positions are int32 (the backend refuses ``seq >= 2**31``), every element offset
is int64. For branch ``(w, r)``, query head
``h`` (phase ``p = h % r``) and segment ``s``, row ``i`` is position ``t = s * w + p + r * i``: a
strided view with row stride ``r * heads * head_dim``, so no gathered copy exists.

Forward: a program owns ``BLOCK_M`` rows of one (segment, batch * head), runs the online softmax
over the segment's keys, and merges its result into the float32 running output and LSE by
log-sum-exp (branches are launched one after the other, so the merge needs no atomics).
Backward (FlashAttention-2): with the merged LSE ``L`` the branches form one softmax, so every
branch contributes ``dS = P * (dP - Delta)`` with ``P = exp(S - L)``. ``branch_backward_dq`` owns
a query block and adds dq without atomics; ``branch_backward`` owns a key block, accumulates dk/dv
over the segment's query blocks and adds them with atomics (grouped query heads share a kv head).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dilated.kernels.triton_kernels.merge_kernel import lse_weights


@triton.jit
def _program_head(H, group, w, r, seg0, bh0):
    """Batch (int64), head (int64, for offsets), kv head (int64) and first position (int32) of this
    program's (segment, batch * head); ``seg0``/``bh0`` offset the grid's axes 1 and 2 when
    a launch covers only a chunk of them (CUDA caps those axes at 65535)."""
    bh = tl.program_id(2) + bh0
    b = bh // H
    h = bh % H
    base = (tl.program_id(1) + seg0) * w + h % r
    return b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64), base


@triton.jit
def _query_rows(b64, h, base, offs_i, offs_d, dmask, rows, n, r, sqb, sqn, sqh):
    """Positions (int64), validity, element offsets and 2-D mask of query rows ``offs_i``."""
    t = base + offs_i * r
    q_ok = (offs_i < rows) & (t < n)
    t64 = t.to(tl.int64)
    q_off = b64 * sqb + t64[:, None] * sqn + h * sqh + offs_d[None, :]
    return t64, q_ok, q_off, q_ok[:, None] & dmask[None, :]


@triton.jit
def _key_block(
    K, V, Mask, b64, hk, base, offs_j, offs_d, dmask, rows, n, r, skb, skn, skh,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Keys and values of rows ``offs_j`` (0 where not allowed), their validity and offsets."""
    u = base + offs_j * r
    k_ok = (offs_j < rows) & (u < n)
    if HAS_MASK:
        pad = tl.load(Mask + b64 * n + u, mask=k_ok, other=0)
        k_ok = k_ok & (pad != 0)
    kv_off = b64 * skb + u.to(tl.int64)[:, None] * skn + hk * skh + offs_d[None, :]
    kv_m = k_ok[:, None] & dmask[None, :]
    k = tl.load(K + kv_off, mask=kv_m, other=0.0)
    v = tl.load(V + kv_off, mask=kv_m, other=0.0)
    return k, v, k_ok, kv_off, kv_m


@triton.jit
def _row_stats(Lse, Delta, b64, h, t64, q_ok, slb, slh):
    """Merged LSE (``+inf`` for empty rows, so that ``exp(s - lse)`` is 0) and Delta."""
    lse = tl.load(Lse + b64 * slb + h * slh + t64, mask=q_ok, other=float("-inf"))
    delta = tl.load(Delta + b64 * slb + h * slh + t64, mask=q_ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse), delta


@triton.jit
def branch_forward(
    Q,
    K,
    V,
    Mask,
    AccO,
    Lse,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    sab,
    san,
    sah,
    slb,
    slh,
    n,
    H,
    group,
    w,
    r,
    rows,
    scale,
    seg0,
    bh0,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    mblock = tl.program_id(0)
    b64, h, hk, base = _program_head(H, group, w, r, seg0, bh0)
    offs_i = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t64, q_ok, q_off, qm = _query_rows(
        b64, h, base, offs_i, offs_d, dmask, rows, n, r, sqb, sqn, sqh
    )
    q = tl.load(Q + q_off, mask=qm, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = rows
    if IS_CAUSAL:
        hi = tl.minimum(rows, (mblock + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        k, v, k_ok, _, _ = _key_block(
            K, V, Mask, b64, hk, base, offs_j, offs_d, dmask, rows, n, r, skb, skn, skh,
            HAS_MASK,
        )  # fmt: skip
        allowed = k_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_j[None, :] <= offs_i[:, None])
        m_i, l_i, acc = softmax_step(q, k, v, allowed, m_i, l_i, acc, scale, DOT_PREC)
    o_off = b64 * sab + t64[:, None] * san + h * sah + offs_d[None, :]
    merge_block(AccO, Lse, o_off, b64 * slb + h * slh + t64, acc, m_i, l_i, q_ok, qm, q_ok, qm)


@triton.jit
def softmax_step(q, k, v, allowed, m_i, l_i, acc, scale, DOT_PREC: tl.constexpr):
    """One key block of the online softmax: the new row max, row sum and unnormalised output."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    pr = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def merge_block(AccO, Lse, o_off, lse_off, acc, m_i, l_i, valid, valid2d, read, read2d):
    """Merge a block's online-softmax state (``acc`` unnormalised, row max ``m_i``, row sum
    ``l_i``) into the float32 running output and LSE at ``AccO + o_off`` / ``Lse + lse_off``
    by log-sum-exp, storing the ``valid`` rows. Rows outside ``read`` are not read: nothing was
    merged into them yet, whatever the accumulators hold."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse_b = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    o_b = acc / l_safe[:, None]
    old_lse = tl.load(Lse + lse_off, mask=read, other=float("-inf"))
    keep, take, new_lse = lse_weights(old_lse, lse_b)
    old_o = tl.load(AccO + o_off, mask=read2d, other=0.0)
    out = old_o * keep[:, None] + o_b * take[:, None]
    tl.store(AccO + o_off, out, mask=valid2d)
    tl.store(Lse + lse_off, new_lse, mask=valid)


@triton.jit
def branch_backward(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    slb,
    slh,
    n,
    H,
    group,
    w,
    r,
    rows,
    scale,
    seg0,
    bh0,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    nblock = tl.program_id(0)
    b64, h, hk, base = _program_head(H, group, w, r, seg0, bh0)
    offs_j = nblock * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k, v, k_ok, kv_off, kv_m = _key_block(
        K, V, Mask, b64, hk, base, offs_j, offs_d, dmask, rows, n, r, skb, skn, skh, HAS_MASK
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (nblock * BLOCK_N // BLOCK_M) * BLOCK_M
    for start in range(lo, rows, BLOCK_M):
        offs_i = start + tl.arange(0, BLOCK_M)
        t64, q_ok, q_off, qm = _query_rows(
            b64, h, base, offs_i, offs_d, dmask, rows, n, r, sqb, sqn, sqh
        )
        q = tl.load(Q + q_off, mask=qm, other=0.0)
        do = tl.load(DO + q_off, mask=qm, other=0.0)
        lse_safe, delta = _row_stats(Lse, Delta, b64, h, t64, q_ok, slb, slh)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        allowed = q_ok[:, None] & k_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_j[None, :] <= offs_i[:, None])
        pr = tl.where(allowed, tl.exp(s - lse_safe[:, None]), 0.0)
        dv += tl.dot(tl.trans(pr).to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = pr * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    tl.atomic_add(DK + kv_off, dk, mask=kv_m)
    tl.atomic_add(DV + kv_off, dv, mask=kv_m)


@triton.jit
def branch_backward_dq(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DQ,
    sqb,
    sqn,
    sqh,
    skb,
    skn,
    skh,
    slb,
    slh,
    n,
    H,
    group,
    w,
    r,
    rows,
    scale,
    seg0,
    bh0,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # dq of one branch: a program owns a query block (as in the forward), so it adds its result
    # to the float32 dq buffer without atomics (branches are successive launches).
    mblock = tl.program_id(0)
    b64, h, hk, base = _program_head(H, group, w, r, seg0, bh0)
    offs_i = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t64, q_ok, q_off, qm = _query_rows(
        b64, h, base, offs_i, offs_d, dmask, rows, n, r, sqb, sqn, sqh
    )
    q = tl.load(Q + q_off, mask=qm, other=0.0)
    do = tl.load(DO + q_off, mask=qm, other=0.0)
    lse_safe, delta = _row_stats(Lse, Delta, b64, h, t64, q_ok, slb, slh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = rows
    if IS_CAUSAL:
        hi = tl.minimum(rows, (mblock + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        u = base + offs_j * r
        k_ok = (offs_j < rows) & (u < n)
        if HAS_MASK:
            pad = tl.load(Mask + b64 * n + u, mask=k_ok, other=0)
            k_ok = k_ok & (pad != 0)
        u64 = u.to(tl.int64)
        kv_off = b64 * skb + u64[:, None] * skn + hk * skh + offs_d[None, :]
        kv_m = k_ok[:, None] & dmask[None, :]
        k = tl.load(K + kv_off, mask=kv_m, other=0.0)
        v = tl.load(V + kv_off, mask=kv_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        allowed = q_ok[:, None] & k_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (offs_j[None, :] <= offs_i[:, None])
        pr = tl.where(allowed, tl.exp(s - lse_safe[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = pr * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    old = tl.load(DQ + q_off, mask=qm, other=0.0)
    tl.store(DQ + q_off, old + dq, mask=qm)
