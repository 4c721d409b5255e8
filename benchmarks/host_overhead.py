"""The host time of dilated's own layers for one eager call, on any machine (no GPU needed).

The op runs on CPU tensors through the strided sub-problem backend (``backend="cudnn"``, which
the CPU takes under ``TRITON_INTERPRET=1``) with the dense engines, the Triton merge and sum
launches and the table uploads replaced by stubs, so what is timed is the Python and PyTorch
work of validation, dispatch, planning, views and tables: the part of a short call's host
time that this project controls (the engines' own host cost comes on top; see
``benchmarks/shapes.py``'s ``host_ms`` on a GPU). Best of 7 blocks of ``--calls`` calls.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --seqs 4096 16384 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

import dilated.kernels.strided_run as strided_run
from dilated.kernels import dilated_attention


@contextmanager
def stubbed_device_work() -> Iterator[None]:
    """Inside the block, the engines return empty results and the launches and uploads do
    nothing; everything is restored after it."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> Any:
        b, n, h, _d = q.shape
        return torch.empty(q.shape, dtype=q.dtype), torch.empty(b, h, n)

    def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any,
                 **__: Any) -> Any:  # fmt: skip
        return (torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype),
                torch.empty(v.shape, dtype=v.dtype))  # fmt: skip

    stubs = {
        "subproblem_attention": forward,
        "subproblem_attention_backward": backward,
        "merge_pieces": lambda *a, **k: None,
        "sum_pieces": lambda *a, **k: None,
        "upload": lambda table, device: table,
    }
    saved = {name: getattr(strided_run, name) for name in stubs}
    interpret = os.environ.get("TRITON_INTERPRET")
    try:
        # The CPU takes the strided backend only under the interpreter (read at each call).
        os.environ["TRITON_INTERPRET"] = "1"
        for name, stub in stubs.items():
            setattr(strided_run, name, stub)
        yield
    finally:
        for name, original in saved.items():
            setattr(strided_run, name, original)
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def best_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def measure(seq: int, args: argparse.Namespace) -> tuple[float, float]:
    """Best host us per eager call at ``seq`` tokens: forward, and forward+backward."""
    q, k, v = (
        torch.randn(1, seq, args.heads, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    dout = torch.randn_like(q)

    def call() -> torch.Tensor:
        out = dilated_attention(
            q, k, v, args.segments, args.rates, backend="cudnn", check_finite=False
        )
        assert isinstance(out, torch.Tensor)
        return out

    def forward() -> None:
        with torch.no_grad():
            call()

    def forward_backward() -> None:
        torch.autograd.grad(call(), (q, k, v), dout)

    result = best_us(forward, args.calls), best_us(forward_backward, args.calls)
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [forward_backward() for _ in range(args.calls)])
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="cProfile the last fwd+bwd")
    args = ap.parse_args(argv)
    with stubbed_device_work():
        rows = [(seq, *measure(seq, args)) for seq in args.seqs]
    print(f"\nhost time of dilated's layers per eager call (engines stubbed), torch "
          f"{torch.__version__}, {args.heads} x {args.head_dim} heads, branches "
          f"{args.segments} / {args.rates}\n")  # fmt: skip
    print("| tokens | fwd us | fwd+bwd us |")
    print("|---|---|---|")
    for seq, fwd, both in rows:
        print(f"| {seq} | {fwd:.0f} | {both:.0f} |")


if __name__ == "__main__":
    main()
