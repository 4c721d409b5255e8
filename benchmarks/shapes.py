"""The shapes users send, on one GPU: short sequences (eager and under a CUDA graph), a packed
batch, and segments longer than the sequence, each row against its baseline in the same run.

Rows (bf16, 16 x 128 heads, branches ``--segments``/``--rates``, batch 1):

* ``short``: the op (each of ``--backends``, default ``"auto"``) at ``--short-seqs`` tokens, fwd
  and fwd+bwd, eager and replayed from a CUDA graph, against the pre-gathered ideal (the fastest of SDPA's backends and
  flash-attn-4 on contiguous sub-problems: ``benchmarks/kernels.py``'s ``measure_ideal``).
  Target (issue 21): >= 0.8x of the ideal at 4K and 8K, >= 0.9x at 16K, eager.
* ``packed``: one call with ``cu_seqlens`` over ``--packed-lengths`` against the sum of each
  length's ideal (branches cut to the length where a segment is longer). Target: within 1.15x.
* ``longer``: the ``--longer-preset`` branches on ``--longer-seq`` tokens (segments longer than
  the sequence), causal fwd+bwd, against the same call with each segment cut to the sequence.
  Target: within 1.2x.

    python benchmarks/shapes.py --json shapes.json
    python benchmarks/shapes.py --rows short --short-seqs 4096 --backends auto cudnn

Each eager row also reports its host time per call (``host_ms``: the calls queued back to back
without a synchronization): where it is close to ``ms``, the call is bound by the host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels import FEATURES, Case, Measured, measure, measure_ideal

from dilated.core.presets import PRESETS
from dilated.core.settings import use_settings
from dilated.kernels import dilated_attention

HEADS, HEAD_DIM, DTYPE = 16, 128, torch.bfloat16


def cut(ws: Sequence[int], rs: Sequence[int], seq: int) -> tuple[int, ...]:
    """Each segment cut to the sequence (rounded up to a multiple of its rate): the same math."""
    return tuple(min(w, -(-seq // r) * r) for w, r in zip(ws, rs))


def ideal(seq: int, ws: Sequence[int], rs: Sequence[int], causal: bool, grad: bool) -> Measured:
    """The pre-gathered ideal of one sequence of ``seq`` tokens (its branches cut to it)."""
    case = Case(
        batch=1, seq=seq, heads=HEADS, kv_heads=HEADS, head_dim=HEAD_DIM,
        segments=cut(ws, rs, seq), rates=tuple(rs), feature=FEATURES["mha"], causal=causal,
        grad=grad, dtype=DTYPE,
    )  # fmt: skip
    return measure_ideal(case)


def op_runner(
    seq: int,
    ws: Sequence[int],
    rs: Sequence[int],
    causal: bool,
    grad: bool,
    cu_seqlens: list[int] | None = None,
    backend: str = "auto",
) -> Callable[[], None]:
    """One call of the op on fresh inputs of ``seq`` tokens."""
    q, k, v = (
        torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, requires_grad=grad)
        for _ in range(3)
    )
    dout = torch.randn_like(q)

    def run() -> None:
        out = dilated_attention(
            q, k, v, list(ws), list(rs), is_causal=causal, cu_seqlens=cu_seqlens,
            check_finite=False, backend=backend,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        if grad:
            torch.autograd.grad(out, (q, k, v), dout)

    return run


def graphed(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` captured once in a CUDA graph (after warm-up on a side stream), then replayed.

    The small-call rule is off for the warm-up and the capture, as the kernels page advises:
    a replay has no host cost to save, and flash-attn-4's kernels are the faster ones."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with use_settings(small_calls_on_sdpa_flash=False):
        with torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    return graph.replay


def host_ms(run: Callable[[], None], calls: int = 20) -> float:
    """Host time per call of ``run``: calls queued back to back, timed without waiting for the
    GPU (one synchronization before and after)."""
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def row(
    kind: str,
    what: str,
    mode: str,
    ms: float,
    base_ms: float,
    base: str,
    host: float = math.nan,
) -> dict[str, Any]:
    r = {
        "kind": kind, "what": what, "mode": mode, "ms": ms, "host_ms": host, "baseline": base,
        "baseline_ms": base_ms, "baseline_over_this": base_ms / ms if ms else math.nan,
    }  # fmt: skip
    print(
        f"{kind:>7} {what:>28} {mode:>7}: {ms:8.3f} ms (host {host:.3f})  {base} "
        f"{base_ms:8.3f} ms  ratio {r['baseline_over_this']:.2f}",
        flush=True,
    )
    return r


def short_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    ws, rs = args.segments, args.rates
    rows = []
    for seq in args.short_seqs:
        for causal in (False, True):
            for grad in (False, True):
                mode = "fwd+bwd" if grad else "fwd"
                base = ideal(seq, ws, rs, causal, grad)
                for backend in args.backends:
                    run = op_runner(seq, ws, rs, causal, grad, backend=backend)
                    what = f"{seq} causal={'on' if causal else 'off'}"
                    what += "" if backend == "auto" else f" {backend}"
                    ms = measure(run).ms
                    rows.append(row("short", what, mode, ms, base.ms, "ideal", host_ms(run)))
                    try:
                        replay = graphed(run)
                    except Exception as exc:  # a capture that fails is a row saying so
                        print(f"    graph capture failed: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    rows.append(
                        row("short", what + " graph", mode, measure(replay).ms, base.ms, "ideal")
                    )
    return rows


def packed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    ws, rs, lengths = args.segments, args.rates, args.packed_lengths
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    rows = []
    for grad in (False, True):
        mode = "fwd+bwd" if grad else "fwd"
        base = sum(ideal(n, ws, rs, True, grad).ms for n in lengths)
        run = op_runner(bounds[-1], ws, rs, True, grad, cu_seqlens=bounds)
        what = f"{len(lengths)} seqs, {bounds[-1]} tokens"
        ms = measure(run).ms
        rows.append(row("packed", what, mode, ms, base, "sum of ideals", host_ms(run)))
    return rows


def longer_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    preset = PRESETS[args.longer_preset]
    ws, rs, seq = preset.segment_lengths, preset.dilation_rates, args.longer_seq
    rows = []
    for grad in (False, True):
        mode = "fwd+bwd" if grad else "fwd"
        base = measure(op_runner(seq, cut(ws, rs, seq), rs, True, grad)).ms
        got = measure(op_runner(seq, ws, rs, True, grad)).ms
        what = f"{args.longer_preset} on {seq}"
        rows.append(row("longer", what, mode, got, base, "cut call"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", nargs="+", default=["short", "packed", "longer"])
    ap.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--short-seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument(
        "--backends", nargs="+", default=["auto"], help="the op's backends for the short rows"
    )
    ap.add_argument(
        "--packed-lengths",
        type=int,
        nargs="+",
        default=[1024, 2048, 2048, 4096, 4096, 8192, 16384, 16384],
    )
    ap.add_argument("--longer-preset", default="longnet_1m", choices=sorted(PRESETS))
    ap.add_argument("--longer-seq", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/shapes.py measures CUDA kernels; no CUDA device here, nothing measured")
        return
    makers = {"short": short_rows, "packed": packed_rows, "longer": longer_rows}
    rows = [r for name in args.rows for r in makers[name](args)]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1, "
          f"{HEADS} x {HEAD_DIM} heads, branches {args.segments} / {args.rates}\n")  # fmt: skip
    print("| kind | what | mode | ms | host ms | baseline | baseline ms | baseline/this |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['what']} | {r['mode']} | {r['ms']:.3f} | {r['host_ms']:.3f} | "
            f"{r['baseline']} | {r['baseline_ms']:.3f} | {r['baseline_over_this']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
