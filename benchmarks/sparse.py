"""Benchmark of dilated-sparse on one GPU: each layout against the dense layout and FlexAttention.

Per sequence length (branches of a preset whose segment fits), per layout and target density
(~50/25/10 %), forward and forward+backward, bfloat16, batch 1:

- ``sparse``: ``dilated.sparse.block_sparse_dilated_attention`` on the path ``"auto"`` picks
  (``path``: ``flash4``, flash-attn-4's block sparsity, on an SM90 GPU with flash-attn-4;
  ``tiles``, the cuDNN calls, elsewhere);
- ``fa4``: flash-attn-4 alone on the pre-gathered sub-problems of each call of the flash4 path,
  with the same block tables (``sparse_flash4.py``): the baseline of each row, where the flash4
  path runs; ``fa4 dense`` the same calls without tables, per sequence length and mode;
- ``tiles``: the op on the tiles path in the same run (where the row's path is ``flash4``);
- ``first``: one call after the flash4 path's plans and tables are dropped (a new length, the
  kernels compiled), against the steady call;
- ``dense``: the dense-layout dilated op, ``dilated.kernels.dilated_attention(backend="cudnn")``,
  timed once per sequence length and mode in the same run;
- ``flex``: FlexAttention given the same pattern as one block mask over the whole sequence (what
  a user would write instead); a mask cannot count a key twice, so it computes the union of the
  branches' keys (the timing is comparable, the values slightly differ). The block mask is built
  blockwise from the layout tables (``flex_block_table``, then ``BlockMask.from_kv_blocks``),
  never by evaluating the mask on every token pair, which at 256K tokens asks for a TiB; every
  kept 128 x 128 tile is a partial block, so the ``mask_mod`` still applies the exact element
  rule. Skipped above ``--flex-max-seq`` (its index tensor grows as ``(seq / 128)^2 x heads``)
  and where it cannot be built. Every row compiles afresh with ``fail_on_recompile_limit_hit``,
  so that FlexAttention can never fall back silently to its eager path (which materialises the
  whole score matrix). ``--cpu-smoke-test`` first checks every block table against the dense
  ``mask_mod``.

``density`` is the fraction of the dense layout's work that the layout keeps (each branch's
kept blocks, weighted by the branch's work, causal halves counted), and **sparse efficiency** is
``dense time x density / sparse time``: 1 means the kept blocks cost what they cost in the dense
computation; flash-attn-4's own efficiency is ``fa4 dense x density / fa4``, and ``sparse/fa4``
is the op's time over the kernel's alone. Times are medians of CUDA-event timings after warm-up; a failing row prints its
error and the run goes on. The rows are also written as JSON (``--out``).

    python benchmarks/sparse.py --out sparse.json
    python benchmarks/sparse.py --quick --out quick.json            # small sizes, smoke test
    python benchmarks/sparse.py --seqs 262144 --layouts local_window --causal
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import sparse_flash4
import torch

from dilated.core import PRESETS, SparsePatternConfig
from dilated.core.settings import set_settings, use_settings
from dilated.core.sparsity import BranchLayout, resolve_layouts
from dilated.kernels import dilated_attention
from dilated.sparse import block_sparse_dilated_attention, paths
from dilated.sparse.engine import count_calls

LAYOUTS = ("local_window", "global_local", "dilated_sparse", "dense")


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` by CUDA events, and its peak extra memory in GiB
    (wall-clock and NaN on the CPU, which only serves as a smoke test of this script)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        wall = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(wall), math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def time_graphed(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """``time_ms`` of ``fn`` captured once in a CUDA graph and replayed: the GPU's time without
    the host's (Python and per-launch) costs, as a training step captured whole would run."""
    if not torch.cuda.is_available():
        return time_ms(fn, warmup, repeats)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(2, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        # The graph's private memory pool escapes the peak statistics: report no peak.
        return time_ms(graph.replay, warmup, repeats)[0], math.nan
    finally:
        del graph


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke test)"


def branch_work(seq: int, w: int, r: int) -> float:
    """Score entries one head computes in branch ``(w, r)`` (rows seq / r, keys w / r each)."""
    return (seq / r) * (w / r)


def density(layouts: Sequence[BranchLayout], seq: int, causal: bool) -> float:
    """Kept fraction of the dense layout's work over all branches."""
    kept = total = 0.0
    for lay in layouts:
        blocks = lay.blocks.double()
        if causal:
            # Below-diagonal blocks fully, diagonal blocks half, of the nb^2 / 2 causal blocks.
            frac = (blocks.tril(-1).sum() + 0.5 * blocks.diagonal().sum()) / (lay.nb**2 / 2)
        else:
            frac = blocks.mean()
        work = branch_work(seq, lay.segment_length, lay.dilation_rate)
        kept += float(frac) * work
        total += work
    return kept / total


def configs(
    layout: str,
    targets: Sequence[float],
    block: int,
    ws: Sequence[int],
    rs: Sequence[int],
    seq: int,
    causal: bool,
) -> list[tuple[float, SparsePatternConfig]]:
    """``(target, config)`` per target density; ``dilated_sparse`` has no window, so its block
    size is chosen to come closest to each target (duplicates dropped)."""
    if layout == "dense":
        return [(1.0, SparsePatternConfig("dense", block_size=block))]
    if layout in ("local_window", "global_local"):
        extra = {"global_tokens": block} if layout == "global_local" else {}
        return [
            (t, SparsePatternConfig(layout, sparsity_ratio=t, block_size=block, **extra))
            for t in targets
        ]
    out: list[tuple[float, SparsePatternConfig]] = []
    seen = set()
    rows = min(w // r for w, r in zip(ws, rs))
    sizes = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048) if b <= rows]
    for t in targets:
        best = min(
            sizes,
            key=lambda b: abs(
                density(
                    resolve_layouts(SparsePatternConfig(layout, block_size=b), ws, rs), seq, causal
                )
                - t
            ),
        )
        if best not in seen:
            seen.add(best)
            out.append((t, SparsePatternConfig(layout, block_size=best)))
    return out


FLEX_BLOCK = 128  # FlexAttention's tile in tokens, both for queries and keys


def flex_block_table(
    layouts: Sequence[BranchLayout],
    seq: int,
    heads: int,
    causal: bool,
    token_block: int = FLEX_BLOCK,
    device: torch.device | str = "cpu",
    *,
    block: int,
) -> torch.Tensor:
    """Bool ``(heads, nt, nt)``, ``nt = ceil(seq / token_block)``: True where some query token of
    token block ``i`` may attend some key token of token block ``j`` under ``FlexPattern``'s
    ``mask_mod`` for that head (exactly: no block without an allowed pair, none missed).

    ``block`` is the layouts' block size in rows. Per branch ``(w, r)`` and phase ``p`` (only the
    phases some head has, ``h % r``), every token of phase ``p`` lies in one global layout block
    ``(segment, row // block)``; ``E`` (``nt x`` global blocks) marks which token blocks hold
    which global blocks, and ``E @ L @ E^T > 0`` with ``L`` block-diagonal (the layout table once
    per segment) are the reachable token-block pairs. ``E`` is scattered token by token rather
    than as ranges, so a stride ``r`` above ``token_block`` (token blocks without the phase) and
    a short last segment (its missing blocks get no tokens) come out right. Sizes stay at
    ``nt x nt`` per phase (float32 counts of 0/1 products: ``> 0`` is exact), never ``seq x seq``.

    Causal: below the diagonal every key precedes every query, so the non-causal answer holds;
    above it nothing is allowed; on the diagonal a pair with key <= query exists iff the block
    holds global blocks ``a >= b`` of one segment with ``blocks[a, b]`` (``a == b``: take the key
    equal to the query), i.e. the diagonal of ``E @ tril(L) @ E^T``, which matters for layouts
    whose diagonal is not all True.
    """
    nt = -(-seq // token_block)
    table = torch.zeros(heads, nt, nt, dtype=torch.bool, device=device)
    diag = torch.zeros(heads, nt, dtype=torch.bool, device=device)
    for lay in layouts:
        w, r, nb = lay.segment_length, lay.dilation_rate, lay.nb
        nseg = -(-seq // w)
        blocks = lay.blocks.to(device=device, dtype=torch.float32)
        lower = blocks.tril()
        for p in sorted({h % r for h in range(heads)}):
            tok = torch.arange(p, seq, r, device=device)
            glob = (tok // w) * nb + ((tok % w) // r) // block
            e = torch.zeros(nt, nseg * nb, device=device)
            e[tok // token_block, glob] = 1.0
            e3 = e.view(nt, nseg, nb)
            # E @ L without building the block-diagonal L: one table product per segment.
            reach = torch.einsum("tsa,ab->tsb", e3, blocks).reshape(nt, nseg * nb)
            table[p::r] |= (reach @ e.T) > 0
            if causal:
                reach_low = torch.einsum("tsa,ab->tsb", e3, lower)
                diag[p::r] |= (reach_low * e3).sum((1, 2)) > 0
            del e, e3, reach
    if causal:
        table &= torch.ones(nt, nt, dtype=torch.bool, device=device).tril(-1)
        ar = torch.arange(nt, device=device)
        table[:, ar, ar] = diag
    return table


def block_mask_from_table(table: torch.Tensor, seq: int, mask_mod: Any, token_block: int) -> Any:
    """A FlexAttention ``BlockMask`` whose partial blocks are the True entries of ``table``
    (``(heads, nt, nt)``) and which has no full blocks: every kept tile still runs
    ``mask_mod``, so the element rule stays exact however a tile is cut by the pattern."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, nt, _ = table.shape
    kv_num_blocks = table.sum(-1, dtype=torch.int32)[None]
    kv_indices = torch.empty(1, heads, nt, nt, dtype=torch.int32, device=table.device)
    for h in range(heads):  # one head at a time: the sort's int64 output stays nt x nt
        # A stable sort of "not kept" puts the kept columns first, in increasing order.
        kv_indices[0, h] = torch.argsort((~table[h]).to(torch.int8), dim=-1, stable=True)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=token_block,
        mask_mod=mask_mod,
        seq_lengths=(seq, seq),
    )


def check_flex_table(
    mask_mod: Any, table: torch.Tensor, seq: int, token_block: int, what: str
) -> None:
    """Assert that ``table`` is exactly the token-block support of ``mask_mod``: every allowed
    pair lies in a True block and every True block holds an allowed pair. Evaluates the mask
    densely (a few query blocks at a time), so only for the small sizes of the smoke test."""
    heads, nt, _ = table.shape
    dev = table.device
    dense = torch.zeros_like(table)
    keys = torch.arange(seq, device=dev)
    step = max(1, 2**22 // (token_block * seq))  # query blocks per mask evaluation
    b = torch.zeros((), dtype=torch.int64, device=dev)
    for h in range(heads):
        hi = torch.tensor(h, device=dev)
        for i0 in range(0, nt, step):
            i1 = min(nt, i0 + step)
            qs = torch.arange(i0 * token_block, min(i1 * token_block, seq), device=dev)
            # Padded to whole token blocks with False (pairs beyond seq do not exist).
            ok = torch.zeros(i1 - i0, token_block, nt, token_block, dtype=torch.bool, device=dev)
            ok.view(-1, nt * token_block)[: len(qs), :seq] = mask_mod(
                b, hi, qs[:, None], keys[None, :]
            )
            dense[h, i0:i1] = ok.any(3).any(1)
    for name, bad in (
        ("allowed pairs outside every True block", dense & ~table),
        ("True blocks without an allowed pair", table & ~dense),
    ):
        if bad.any():
            h, i, j = (int(x) for x in bad.nonzero()[0])
            raise AssertionError(
                f"flex block table of {what} is wrong: {int(bad.sum())} {name} "
                f"(first: head {h}, query block {i}, key block {j})"
            )


def self_check_flex_table() -> None:
    """``check_flex_table`` on branches the smoke test's preset does not reach: several rates
    (one above the token block, so token blocks skip phases), more rates than heads, short last
    segments, and a custom layout without its diagonal (the causal diagonal case)."""
    seq, heads, block, token_block = 2500, 3, 8, 8
    ws, rs = [256, 1024, 2048], [1, 4, 16]
    gen = torch.Generator().manual_seed(0)
    cfgs = [
        SparsePatternConfig("local_window", sparsity_ratio=0.3, block_size=block),
        SparsePatternConfig("global_local", sparsity_ratio=0.3, block_size=block),
        SparsePatternConfig("dilated_sparse", block_size=block),
        SparsePatternConfig(
            "custom",
            block_size=block,
            layout=[
                (torch.rand(n, n, generator=gen) < 0.2).fill_diagonal_(False)
                for n in ((w // r + block - 1) // block for w, r in zip(ws, rs))
            ],
        ),
    ]
    q = torch.zeros(1, seq, heads, 1)
    for causal in (False, True):
        layouts = [resolve_layouts(cfg, ws, rs) for cfg in cfgs]
        flex = FlexPattern(q, ws, rs, causal, max(lay.nb for ls in layouts for lay in ls))
        for cfg, lays in zip(cfgs, layouts):
            flex.load(lays, block)
            table = flex_block_table(lays, seq, heads, causal, token_block, block=block)
            check_flex_table(
                flex.mask_mod, table, seq, token_block, f"{cfg.pattern_type} causal={causal}"
            )
    print("flex block tables: exact on the extra branch set (w=256/1024/2048, r=1/4/16)")


class FlexPattern:
    """FlexAttention over the whole sequence with the pattern as one mask_mod and block mask.

    One compiled ``flex_attention`` serves every layout of a sequence length: the layout tables
    are a tensor that :meth:`load` overwrites in place, so a new layout rebuilds the block mask
    but recompiles nothing. The block size is a Python constant of the ``mask_mod`` (a division
    by a tensor made one forward at 256K tokens 7x slower on an H200: 62.8 s against 8.9 s), so
    each block size compiles once (at most three here). The recompile limit, past which
    FlexAttention would fall back silently to an eager path that materialises the whole score
    matrix, is never approached; it raises if it is.
    """

    def __init__(
        self, q: torch.Tensor, ws: Sequence[int], rs: Sequence[int], causal: bool, nb_max: int
    ) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.seq, self.heads = q.shape[1], q.shape[2]
        self.device = q.device
        self.causal = causal
        self.params = list(zip(ws, rs))
        self.tables = torch.zeros(len(ws), nb_max, nb_max, dtype=torch.bool, device=q.device)
        self.mask_mod = self._mask_mod(1)
        self.block = 1
        torch._dynamo.reset()
        self.fn = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        self.block_mask: Any = None
        self.table = torch.zeros(0, 0, 0, dtype=torch.bool)  # set() fills it

    def _mask_mod(self, block: int) -> Callable[..., torch.Tensor]:
        params, tables, causal = self.params, self.tables, self.causal

        def mask_mod(b, hi, qi, ki):  # type: ignore[no-untyped-def]
            ok = torch.zeros_like(qi, dtype=torch.bool)
            for i, (w, r) in enumerate(params):
                p = hi % r
                same = (qi // w == ki // w) & (qi % r == p) & (ki % r == p)
                qa = ((qi % w) // r) // block
                ka = ((ki % w) // r) // block
                ok = ok | (same & tables[i, qa, ka])
            if causal:
                ok = ok & (ki <= qi)
            return ok

        return mask_mod

    def load(self, layouts: Sequence[BranchLayout], block: int) -> None:
        """Load a layout's tables into the tensor ``mask_mod`` reads (a new ``mask_mod`` when
        the block size changes)."""
        self.tables.zero_()
        for i, lay in enumerate(layouts):
            self.tables[i, : lay.nb, : lay.nb] = lay.blocks.to(self.device)
        if block != self.block:
            self.block, self.mask_mod = block, self._mask_mod(block)

    def set(self, layouts: Sequence[BranchLayout], block: int) -> None:
        """Load a layout and build its block mask blockwise from the layout tables (never a
        dense seq x seq mask); every kept tile is a partial block (no full blocks), so
        ``mask_mod`` decides each element. ``self.table`` keeps the block table."""
        self.load(layouts, block)
        self.table = flex_block_table(
            layouts, self.seq, self.heads, self.causal, FLEX_BLOCK, self.device, block=block
        )
        self.block_mask = block_mask_from_table(self.table, self.seq, self.mask_mod, FLEX_BLOCK)

    def runner(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: bool, dout: torch.Tensor
    ) -> Callable[[], object]:
        qt, kt, vt = (
            x.detach().transpose(1, 2).contiguous().requires_grad_(grad) for x in (q, k, v)
        )
        dt = dout.transpose(1, 2).contiguous()

        def run() -> None:
            o = self.fn(qt, kt, vt, block_mask=self.block_mask)
            if grad:
                torch.autograd.grad(o, (qt, kt, vt), dt)

        return run


def bench_sequence(
    args: argparse.Namespace,
    seq: int,
    ws: list[int],
    rs: list[int],
    record: Callable[[dict[str, object]], None],
) -> None:
    """Every row of one sequence length: the dense layout once per mode, then each layout."""
    h, d, block, causal = args.heads, args.head_dim, args.block_size, args.causal
    device, dtype = (
        ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    )
    q, k, v = (
        torch.randn(1, seq, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn_like(q)

    def step(attend: Callable[[], torch.Tensor], grad: bool) -> Callable[[], object]:
        def run() -> None:
            o = attend()
            if grad:
                torch.autograd.grad(o, (q, k, v), dout)

        return run

    backend = "cudnn" if q.is_cuda else "reference"
    timer = time_graphed if args.cuda_graph else time_ms

    def dense() -> torch.Tensor:
        return dilated_attention(
            q, k, v, ws, rs, is_causal=causal, backend=backend, check_finite=False
        )

    dense_ms: dict[str, float] = {}
    for mode in args.modes:
        try:
            dense_ms[mode] = timer(step(dense, mode == "fwd+bwd"), args.warmup, args.repeats)[0]
        except Exception as exc:  # reported; the sparse rows still run
            print(f"seq={seq} {mode} dense failed: {type(exc).__name__}: {exc}")
            dense_ms[mode] = math.nan
        torch.cuda.empty_cache()
    rows_configs = [
        (layout, target, cfg)
        for layout in args.layouts
        for target, cfg in configs(layout, args.densities, block, ws, rs, seq, causal)
    ]
    fa4_dense_ms: dict[str, float] = {}
    for mode in args.modes:
        fa4_dense_ms[mode] = math.nan
        if rows_configs:
            lays = resolve_layouts(rows_configs[0][2], ws, rs)
            run = sparse_flash4.runner(q, k, v, lays, block, causal, mode == "fwd+bwd", True)
            if run is not None:
                fa4_dense_ms[mode] = timer(run, args.warmup, args.repeats)[0]
            # The baseline's pre-gathered copies (eight per call): at 1M tokens, 40 GB that the
            # rows after it would otherwise run beside.
            run = None
        torch.cuda.empty_cache()
    flex: FlexPattern | None = None
    flex_note = "seq > --flex-max-seq"
    flex_layout: tuple[str, float] | None = None
    if not args.no_flex and seq <= args.flex_max_seq:
        try:
            nb_max = max(
                lay.nb for _, _, cfg in rows_configs for lay in resolve_layouts(cfg, ws, rs)
            )
            flex = FlexPattern(q, ws, rs, causal, nb_max)
        except Exception as exc:
            flex_note = f"FlexAttention unavailable: {type(exc).__name__}: {str(exc)[:80]}"
    if flex is not None and args.cpu_smoke_test:
        # Before any timing, and outside the rows' error handling: a wrong table must fail.
        for layout, target, cfg in rows_configs:
            flex.set(resolve_layouts(cfg, ws, rs), cfg.block_size)
            check_flex_table(flex.mask_mod, flex.table, seq, FLEX_BLOCK, f"{layout} {target}")
        print(f"seq={seq}: flex block tables exact for {len(rows_configs)} layouts", flush=True)
    for layout, target, cfg in rows_configs:
        layouts = resolve_layouts(cfg, ws, rs)
        dens = density(layouts, seq, causal)
        calls = count_calls(
            layouts, cfg.block_size, (1, seq, h, d), h, causal,
            rows_kernel=q.is_cuda and args.rows_kernel == "auto",
        )  # fmt: skip

        def sparse(cfg: SparsePatternConfig = cfg) -> torch.Tensor:
            return block_sparse_dilated_attention(
                q, k, v, ws, rs, sparse_config=cfg, is_causal=causal, check_finite=False
            )

        path = paths.choose_path(q, k)
        for mode in args.modes:
            grad = mode == "fwd+bwd"
            note = ""
            sparse_ms = flex_ms = peak = fa4_ms = first_ms = math.nan
            tiles_ms = math.nan
            try:
                sparse_ms, peak = timer(step(sparse, grad), args.warmup, args.repeats)
                if path == "flash4":
                    first_ms = sparse_flash4.first_call_ms(step(sparse, grad))
                    with use_settings(sparse_flash4=False):
                        tiles_ms = timer(step(sparse, grad), args.warmup, args.repeats)[0]
                else:
                    tiles_ms = sparse_ms
            except Exception as exc:
                note = f"sparse failed: {type(exc).__name__}: {str(exc)[:120]}"
                traceback.print_exc(limit=3)
            torch.cuda.empty_cache()
            try:
                run = sparse_flash4.runner(q, k, v, layouts, cfg.block_size, causal, grad, False)
                if run is not None:
                    fa4_ms = timer(run, args.warmup, args.repeats)[0]
            except Exception as exc:
                note += f" fa4 failed: {type(exc).__name__}: {str(exc)[:120]}"
            run = None
            torch.cuda.empty_cache()
            if flex is not None:
                try:
                    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                        if flex_layout != (layout, target):
                            flex.set(layouts, cfg.block_size)
                            flex_layout = (layout, target)
                        run = flex.runner(q, k, v, grad, dout)
                        flex_ms = time_ms(run, 1, args.flex_repeats)[0]
                except Exception as exc:
                    note += f" flex failed: {type(exc).__name__}: {str(exc)[:120]}"
                torch.cuda.empty_cache()
            elif not args.no_flex:
                note += f" flex skipped ({flex_note})"
            dense_t = dense_ms.get(mode, math.nan)
            record(
                {
                    "seq": seq,
                    "mode": mode,
                    "layout": layout,
                    "target": target,
                    "block_size": cfg.block_size,
                    "windows": [lay.window for lay in layouts],
                    "density": dens,
                    "calls": calls,
                    "path": path,
                    "sparse_ms": sparse_ms,
                    "sparse_peak_gib": peak,
                    "fa4_ms": fa4_ms,
                    "fa4_dense_ms": fa4_dense_ms.get(mode, math.nan),
                    "fa4_efficiency": fa4_dense_ms.get(mode, math.nan) * dens / fa4_ms,
                    "vs_fa4": sparse_ms / fa4_ms,
                    "tiles_ms": tiles_ms,
                    "vs_tiles": tiles_ms / sparse_ms,
                    "first_ms": first_ms,
                    "first_vs_steady": first_ms / sparse_ms,
                    "dense_ms": dense_t,
                    "flex_ms": flex_ms,
                    "efficiency": dense_t * dens / sparse_ms,
                    "vs_flex": flex_ms / sparse_ms,
                    "cuda_graph": args.cuda_graph,
                    "rows_kernel": args.rows_kernel,
                    "note": note.strip(),
                }
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[262144, 1048576])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--preset", default="longnet_1m", choices=sorted(PRESETS))
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--flex-max-seq", type=int, default=262144)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument(
        "--flex-repeats", type=int, default=3, help="timed FlexAttention calls (after one warm-up)"
    )
    ap.add_argument(
        "--rows-kernel",
        choices=["auto", "off"],
        default="auto",
        help="off: every one-row tile as its own primitive call (the setting sparse_rows_kernel)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time the dense and sparse rows as replays of a captured CUDA graph (no host cost)",
    )
    ap.add_argument("--quick", action="store_true", help="16K and 32K tokens, two densities")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument(
        "--cpu-smoke-test", action="store_true", help="run the script on the CPU at tiny sizes"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke_test:
        raise SystemExit("benchmarks/sparse.py needs a CUDA GPU (or --cpu-smoke-test)")
    if args.quick:
        args.seqs, args.densities, args.repeats = [16384, 32768], [0.5, 0.25], 5
    if args.cpu_smoke_test:
        args.seqs, args.heads, args.head_dim, args.block_size = [4096, 8192], 2, 16, 32
        args.densities, args.warmup, args.repeats, args.preset = [0.25], 1, 1, "longnet_1m"
    if args.cpu_smoke_test and not args.no_flex:
        self_check_flex_table()
    set_settings(sparse_rows_kernel=None if args.rows_kernel == "auto" else False)
    preset = PRESETS[args.preset]
    h, d, block, causal = args.heads, args.head_dim, args.block_size, args.causal
    rows: list[dict[str, object]] = []

    def record(row: dict[str, object]) -> None:
        rows.append(row)
        print(
            f"seq={row['seq']:>8} {row['mode']:>7} {row['layout']:>14} "
            f"density={row['density']:.3f} {row['path']} sparse={row['sparse_ms']:.2f} ms "
            f"dense={row['dense_ms']:.2f} ms eff={row['efficiency']:.2f} "
            f"fa4={row['fa4_ms']:.2f} ms fa4_eff={row['fa4_efficiency']:.2f} "
            f"sparse/fa4={row['vs_fa4']:.2f} tiles={row['tiles_ms']:.2f} ms "
            f"first={row['first_ms']:.1f} ms "
            f"flex={row['flex_ms']:.2f} ms flex/sparse={row['vs_flex']:.1f}x "
            f"calls={row['calls']} {row['note']}",
            flush=True,
        )

    for seq in args.seqs:
        ws = [w for w in preset.segment_lengths if w <= seq]
        rs = [r for w, r in zip(preset.segment_lengths, preset.dilation_rates) if w <= seq]
        if not ws:
            print(f"seq={seq}: no branch of {args.preset} fits; skipped")
            continue
        print(f"seq={seq}: branches w={ws} r={rs}", flush=True)
        try:
            bench_sequence(args, seq, ws, rs, record)
        except torch.OutOfMemoryError:
            print(f"seq={seq}: inputs do not fit; skipped")
        torch.cuda.empty_cache()

    what = ("causal" if causal else "non-causal") + (", CUDA graphs" if args.cuda_graph else "")
    print(
        f"\n{device_name()}, torch {torch.__version__}, "
        f"{'bf16' if torch.cuda.is_available() else 'float32'}, batch 1, {h} heads x {d}, preset {args.preset}, {what}, block {block} rows; "
        "efficiency = dense ms x density / sparse ms (dense: the cudnn op); fa4 = flash-attn-4 "
        "on the pre-gathered sub-problems with the same tables, its efficiency against itself "
        "without tables; sparse/fa4 = sparse ms / fa4 ms; tiles/sparse = the tiles path's ms / "
        "sparse ms; first/steady = one call at a new length / the steady call; "
        "flex/sparse = FlexAttention ms / sparse ms"
    )
    print(
        "| seq | mode | layout | block | density | path | sparse ms | efficiency | fa4 ms | "
        "fa4 efficiency | sparse/fa4 | tiles/sparse | first/steady | dense ms | flex/sparse |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']:,} | {r['mode']} | {r['layout']} | {r['block_size']} | "
            f"{r['density']:.2f} | {r['path']} | {r['sparse_ms']:.2f} | {r['efficiency']:.2f} | "
            f"{r['fa4_ms']:.2f} | {r['fa4_efficiency']:.2f} | {r['vs_fa4']:.2f} | "
            f"{r['vs_tiles']:.2f} | {r['first_vs_steady']:.2f} | {r['dense_ms']:.2f} | "
            f"{r['vs_flex']:.1f}x |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": device_name(),
                    "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "args": vars(args),
                    "rows": rows,
                },
                f,
                indent=1,
                default=str,
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
