"""Benchmark of dilated-kernels against the reference, "ideal" and FlexAttention (one GPU).

Per sequence length, forward and forward+backward: the dilated-core reference path, "ideal"
(torch SDPA over sub-problems already gathered into contiguous tensors: same FLOPs, no gather or
merge), FlexAttention with a mask_mod for the pattern, and the backends of dilated-kernels
("cudnn": cuDNN per sub-problem + fused Triton merge; "triton": the fused kernel; "sdpa"). Prints median times (triton.testing.do_bench), TFLOP/s counted as
``4 * heads * sum_i(seq * (w_i / r_i) * head_dim / r_i)`` forward (x3.5 for forward+backward,
halved for causal), peak memory and ratios, and writes the rows as JSON.

    python benchmarks/kernels.py --seqs 32768 262144 --json kernels.json
    python benchmarks/kernels.py --seqs 4194304 --methods cudnn --modes fwd
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton.testing

from dilated.core.functional import dilated_attention as core_attention
from dilated.kernels import dilated_attention


def flops(seq: int, heads: int, d: int, ws: list[int], rs: list[int], causal: bool) -> float:
    f = sum(4 * heads * seq * (w / r) * d / r for w, r in zip(ws, rs))
    return f / 2 if causal else f


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """Median ms and peak GiB of ``fn``; inf on out-of-memory."""
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
        return float(ms), peak
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return math.inf, math.inf


def ideal_inputs(b, seq, h, d, ws, rs, dtype, grad):  # type: ignore[no-untyped-def]
    parts = []
    for w, r in zip(ws, rs):
        shape = (b * (seq // w), h, w // r, d)
        parts.append(
            tuple(torch.randn(shape, device="cuda", dtype=dtype, requires_grad=grad) for _ in "qkv")
        )
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32768, 262144])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--flex-max-seq", type=int, default=32768)
    ap.add_argument("--reference-max-seq", type=int, default=32768)
    ap.add_argument(
        "--methods", nargs="+", default=["reference", "ideal", "flex", "cudnn", "triton"]
    )
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    b, h, d, ws, rs, causal = 1, args.heads, args.head_dim, args.segments, args.rates, args.causal
    dtype = torch.bfloat16
    rows = []
    for seq in args.seqs:
        fl = flops(seq, h, d, ws, rs, causal)
        for mode in args.modes:
            grad = mode == "fwd+bwd"
            res: dict[str, tuple[float, float]] = {}
            for method in args.methods:
                note = ""
                try:
                    if method == "ideal":
                        parts = ideal_inputs(b, seq, h, d, ws, rs, dtype, grad)

                        def run(parts=parts, grad=grad) -> None:  # type: ignore[no-untyped-def]
                            outs = [
                                F.scaled_dot_product_attention(*p, is_causal=causal) for p in parts
                            ]
                            if grad:
                                torch.autograd.grad(
                                    outs, [x for p in parts for x in p], [o.detach() for o in outs]
                                )

                    elif method == "reference" and seq > args.reference_max_seq:
                        res[method] = (math.nan, math.nan)
                        continue
                    elif method == "flex":
                        if seq > args.flex_max_seq:
                            res[method] = (math.nan, math.nan)
                            continue
                        run = flex_runner(b, seq, h, d, ws, rs, dtype, grad, causal)
                    else:
                        q, k, v = (
                            torch.randn(
                                b, seq, h, d, device="cuda", dtype=dtype, requires_grad=grad
                            )
                            for _ in range(3)
                        )
                        dout = torch.randn_like(q) if grad else None

                        def run(method: str = method, q=q, k=k, v=v, grad=grad, dout=dout) -> None:  # type: ignore[no-untyped-def]
                            if method == "reference":
                                o = core_attention(
                                    q, k, v, ws, rs, is_causal=causal, check_finite=False
                                )
                            else:
                                o = dilated_attention(
                                    q,
                                    k,
                                    v,
                                    ws,
                                    rs,
                                    is_causal=causal,
                                    backend=method,
                                    check_finite=False,
                                )
                            if grad:
                                torch.autograd.grad(o, (q, k, v), dout)

                    res[method] = measure(run)
                except Exception as exc:  # a failing method is reported, not fatal
                    note = f"{type(exc).__name__}: {str(exc)[:80]}"
                    res[method] = (math.nan, math.nan)
                    print(f"  {method} {mode} seq={seq} failed: {note}")
                torch.cuda.empty_cache()
            total_flops = fl * (3.5 if grad else 1.0)
            for method, (ms, mem) in res.items():
                row = {
                    "seq": seq,
                    "mode": mode,
                    "method": method,
                    "ms": ms,
                    "peak_gib": mem,
                    "tflops": total_flops / (ms * 1e-3) / 1e12 if ms == ms and ms > 0 else math.nan,
                    "vs_ideal": res.get("ideal", (math.nan,))[0] / ms
                    if ms == ms and ms > 0
                    else math.nan,
                }
                rows.append(row)
                print(
                    f"seq={seq:>8} {mode:>7} {method:>9}: {ms:9.2f} ms {row['tflops']:7.1f} TFLOP/s "
                    f"peak {mem:6.2f} GiB  ideal/this {row['vs_ideal']:.2f}",
                    flush=True,
                )
    print("\n| seq | mode | method | median ms | TFLOP/s | peak GiB | speed vs ideal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']:,} | {r['mode']} | {r['method']} | {r['ms']:.2f} | {r['tflops']:.1f} | "
            f"{r['peak_gib']:.2f} | {r['vs_ideal']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                    "shape": {"batch": b, "heads": h, "head_dim": d, "segments": ws, "rates": rs},
                    "causal": causal,
                    "rows": rows,
                },
                f,
                indent=1,
            )


def flex_runner(b, seq, h, d, ws, rs, dtype, grad, causal):  # type: ignore[no-untyped-def]
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    wt = torch.tensor(ws, device="cuda")
    rt = torch.tensor(rs, device="cuda")

    def mask_mod(bi, hi, qi, ki):  # type: ignore[no-untyped-def]
        ok = torch.zeros_like(qi, dtype=torch.bool)
        for i in range(len(ws)):
            w, r = wt[i], rt[i]
            p = hi % r
            m = (qi // w == ki // w) & (qi % r == p) & (ki % r == p)
            ok = ok | m
        if causal:
            ok = ok & (ki <= qi)
        return ok

    # A mask cannot count a key twice, so this is the union pattern (one softmax over the set
    # union, not the multiset): the timing is comparable, the values slightly differ.
    # _compile builds the block mask blockwise instead of from a dense seq x seq mask.
    block = create_block_mask(mask_mod, b, h, seq, seq, device="cuda", _compile=True)
    fn = torch.compile(flex_attention)
    q, k, v = (
        torch.randn(b, h, seq, d, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3)
    )

    dout = torch.randn_like(q) if grad else None

    def run() -> None:
        o = fn(q, k, v, block_mask=block)
        if grad:
            torch.autograd.grad(o, (q, k, v), dout)

    return run


if __name__ == "__main__":
    main()
