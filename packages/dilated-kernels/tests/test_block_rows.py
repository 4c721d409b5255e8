"""rows_forward_into (its Triton kernel under ``TRITON_INTERPRET=1``) against float64 attention
of the same rows and keys written out by hand: a dilated run with grouped-query heads, several
key runs per entry, entries that write fresh rows and entries that merge onto earlier ones,
a key padding mask and rows past the sequence's end."""

from __future__ import annotations

import math

import pytest
import torch

from dilated.kernels._capabilities import HAS_TRITON
from dilated.kernels.backends.triton import interpreting
from dilated.kernels.block_rows import RowsGeometry, RowsTable, block_m, rows_forward_into

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()), reason="needs triton with TRITON_INTERPRET=1"
)

# Branch w = 16, r = 2 on 37 positions: phase 1 (heads 1 and 3, key/value heads 0 and 1),
# two full segments of 8 rows from row 0, and a short one (rows 16, 17) as its own run.
B, N, H, HKV, D = 2, 37, 4, 2, 16
FULL = RowsGeometry(
    rate=2, phase0=1, phases=1, heads=2, kv0=0, kv_step=1, kv_group=1, start=0, count=2, length=8
)
SHORT = RowsGeometry(
    rate=2, phase0=1, phases=1, heads=2, kv0=0, kv_step=1, kv_group=1, start=16, count=1, length=2
)


def _expected(
    x: dict[str, torch.Tensor], geometry: RowsGeometry, rows: range, keys: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(out, lse)`` ``(batch, count, len(rows), heads, D)`` of the given rows and keys
    (key rows at or past a segment's length do not exist)."""
    g = geometry
    outs, lses = [], []
    for s in range(g.count):
        pos = [g.phase0 + g.rate * (g.start + s * g.length + i) for i in range(g.length)]
        qi = [pos[i] for i in rows if i < g.length and pos[i] < N]
        ki = torch.tensor([pos[j] for j in keys if j < g.length and pos[j] < N])
        q = x["q"][:, qi][:, :, [1, 3]].double()
        k = x["k"][:, ki].double()
        v = x["v"][:, ki].double()
        s_ = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        s_ = s_.masked_fill(~x["mask"][:, ki].bool()[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s_, -1)
        out = torch.einsum("bhij,bjhd->bihd", torch.softmax(s_, -1).nan_to_num(), v)
        outs.append(out)
        lses.append(lse.transpose(1, 2))
    return torch.stack(outs, 1), torch.stack(lses, 1)


def _got(
    acc: torch.Tensor, lse: torch.Tensor, geometry: RowsGeometry, rows: range
) -> tuple[torch.Tensor, torch.Tensor]:
    g = geometry
    outs, lses = [], []
    for s in range(g.count):
        pos = [g.phase0 + g.rate * (g.start + s * g.length + i) for i in range(g.length)]
        qi = [pos[i] for i in rows if i < g.length and pos[i] < N]
        outs.append(acc[:, qi][:, :, [1, 3]].double())
        lses.append(lse[:, qi][:, :, [1, 3], 0].double())
    return torch.stack(outs, 1), torch.stack(lses, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_fresh_rows_then_merged_rows(dtype: torch.dtype, masked: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    # Keys/values with grouped heads, stored (batch, seq, kv_heads, D) as the kernel expects.
    x = {
        "q": torch.randn(B, N, H, D, generator=gen).to(dtype),
        "k": torch.randn(B, N, HKV, D, generator=gen).to(dtype),
        "v": torch.randn(B, N, HKV, D, generator=gen).to(dtype),
        "mask": (torch.rand(B, N, generator=gen) > 0.3).to(torch.int8)
        if masked
        else torch.ones(B, N, dtype=torch.int8),
    }
    acc = torch.full((B, N, H, D), float("nan"))
    lse = torch.full((B, N, H, 1), float("nan"))
    bm = block_m(D)
    mask = x["mask"] if masked else None
    # Rows 0..7 (entries of bm rows) see keys 3, 4 first, written fresh; then keys 0..2 and
    # 5..7, merged (two runs in one entry): together every key of the segment.
    fresh = RowsTable(
        tuple((lo, min(lo + bm, 8), 0, 1, 1) for lo in range(0, 8, bm)), ((3, 5),), bm
    )
    merged = RowsTable(
        tuple((lo, min(lo + bm, 8), 0, 2, 0) for lo in range(0, 8, bm)), ((0, 3), (5, 8)), bm
    )
    for geometry in (FULL, SHORT):
        for table in (fresh, merged):
            rows_forward_into(
                x["q"], x["k"], x["v"], mask, acc, lse, geometry, table, scale=1 / math.sqrt(D)
            )
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for geometry in (FULL, SHORT):
        want_out, want_lse = _expected(x, geometry, range(8), list(range(8)))
        got_out, got_lse = _got(acc, lse, geometry, range(8))
        torch.testing.assert_close(got_out, want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(got_lse, want_lse, atol=tol, rtol=tol)
    # Heads of the other phase and positions of phase 0 were never written.
    assert acc[:, :, [0, 2]].isnan().all()
    assert acc[:, 0::2].isnan().all()


def test_entries_of_the_wrong_size_are_refused() -> None:
    table = RowsTable(((0, 4, 0, 1, 1),), ((0, 4),), block_m(D) * 2)
    q = torch.zeros(1, 8, 1, D)
    geometry = RowsGeometry(1, 0, 1, 1, 0, 1, 1, 0, 1, 8)
    acc, lse = torch.zeros(1, 8, 1, D), torch.zeros(1, 8, 1, 1)
    with pytest.raises(ValueError, match="table entries hold"):
        rows_forward_into(q, q, q, None, acc, lse, geometry, table, scale=1.0)
