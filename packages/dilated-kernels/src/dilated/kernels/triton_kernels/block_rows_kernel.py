# Triton kernels take upper-case pointer names and untyped JIT arguments by convention.
# ruff: noqa: N803
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""The Triton kernel of [`dilated.kernels.block_rows`][dilated.kernels.block_rows].

Grid: (entry, segment, batch * head). An entry is at most ``BLOCK_M`` query rows of a
sub-problem with a list of key-row runs; the program runs the online softmax over those runs
and merges the result into the float32 accumulators (one entry per query row and launch, so
no atomics). Heads: index ``j`` of axis 2 (after the batch) is folded phase ``p = j % PH`` and
head ``c = j // PH`` of it, query head ``phase0 + p + c * r``, key/value head
``kv0 + p + (c // KVG) * kv_step``; row ``i`` of segment ``s`` is position
``phase0 + p + r * (start + s * length + i)``. The loads, bounds and key mask are those of the
``"triton"`` backend's kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dilated.kernels.triton_kernels.fused_attention import (
    _key_block,
    _query_rows,
    merge_block,
    softmax_step,
)


@triton.jit
def rows_forward(
    Q,
    K,
    V,
    Mask,
    AccO,
    AccLse,
    Entries,
    Runs,
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
    sln,
    slh,
    n,
    r,
    phase0,
    PH,
    HP,
    kv0,
    kv_step,
    KVG,
    start,
    length,
    scale,
    seg0,
    bh0,
    HAS_MASK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    e = tl.program_id(0)
    seg = tl.program_id(1) + seg0
    bh = tl.program_id(2) + bh0
    b64 = (bh // (PH * HP)).to(tl.int64)
    j = bh % (PH * HP)
    p = j % PH
    c = j // PH
    h = (phase0 + p + c * r).to(tl.int64)
    hk = (kv0 + p + (c // KVG) * kv_step).to(tl.int64)
    base = phase0 + p + r * (start + seg * length)
    # Entry: query rows [q_lo, q_hi) of the segment, key runs [run_lo, run_hi) of Runs, and
    # whether no earlier call wrote these rows.
    q_lo = tl.load(Entries + e * 5)
    q_hi = tl.minimum(tl.load(Entries + e * 5 + 1), length)
    run_lo = tl.load(Entries + e * 5 + 2)
    run_hi = tl.load(Entries + e * 5 + 3)
    first = tl.load(Entries + e * 5 + 4)
    offs_i = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t64, q_ok, q_off, qm = _query_rows(
        b64, h, base, offs_i, offs_d, dmask, q_hi, n, r, sqb, sqn, sqh
    )
    q = tl.load(Q + q_off, mask=qm, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for run in range(run_lo, run_hi):
        k_lo = tl.load(Runs + run * 2)
        k_hi = tl.minimum(tl.load(Runs + run * 2 + 1), length)
        for k0 in range(k_lo, k_hi, BLOCK_N):
            offs_j = k0 + tl.arange(0, BLOCK_N)
            k, v, k_ok, _, _ = _key_block(
                K, V, Mask, b64, hk, base, offs_j, offs_d, dmask, k_hi, n, r, skb, skn, skh,
                HAS_MASK,
            )  # fmt: skip
            m_i, l_i, acc = softmax_step(q, k, v, k_ok[None, :], m_i, l_i, acc, scale, DOT_PREC)
    o_off = b64 * sab + t64[:, None] * san + h * sah + offs_d[None, :]
    lse_off = b64 * slb + t64 * sln + h * slh
    read = q_ok & ((offs_i * 0 + first) == 0)
    merge_block(
        AccO, AccLse, o_off, lse_off, acc, m_i, l_i, q_ok, qm, read, read[:, None] & dmask[None, :]
    )


__all__ = ["rows_forward"]
