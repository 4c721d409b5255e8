"""``dilated bench``: installed implementations against dense attention at growing lengths.

Every implementation that runs on the device (distributed ones as a world of one, see
[`select_implementations`][dilated.core.cli.selection.select_implementations]), plus ``dense``
(torch SDPA over the whole sequence, no dilation: the cost dilated attention avoids), is called
at each ``--seq-lens`` on random ``(batch, seq, heads, head_dim)`` inputs; the report names the
kinds that did not run and why. Per cell the table shows:

- time: median ms per call, and in brackets the first and third quartiles, by
  ``torch.utils.benchmark.Timer.blocked_autorange`` after ``--warmup`` calls: blocks of calls
  for at least ``--min-time`` seconds and at least ``--repeats`` blocks (it synchronises CUDA);
  forward only, or forward + backward with ``--backward``;
- tokens/s: ``batch * seq / median``;
- peak memory on CUDA, from one more, untimed call: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call (not measured on CPU,
  where PyTorch keeps no allocator statistics);
- max err: the Concepts page's ``max|out - ref| / max|ref|`` against the ``dilated.core`` reference run in
  float64 (up to ``--max-check-seq``; dense computes another function and has none).

Dense is skipped above ``--max-dense-seq``; a cell that runs out of memory shows ``OOM``, one
whose input the implementation refuses (``ValueError``) shows ``refused`` and one that raises
otherwise shows ``error``; the other cells still run. ``--kinds`` runs only the named kinds;
every kind that does not run is named with the reason. ``--device``, ``--kinds`` and ``--plot``
are checked before anything runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dilated.core.cli.measure import peak_bytes, timed
from dilated.core.cli.options import (
    DTYPES,
    branches,
    int_list,
    name_list,
    non_negative_int,
    plot_path,
    positive_float,
    positive_int,
    resolve_device,
)
from dilated.core.cli.progress import ProgressBar
from dilated.core.cli.selection import select_implementations
from dilated.core.cli.table import format_table
from dilated.core.reference import dilated_attention_reference
from dilated.core.testing import make_inputs, relative_error

CPU_DEFAULTS = {
    "seq_lens": [1024, 2048, 4096, 8192],
    "heads": 8,
    "head_dim": 64,
    "dtype": "float32",
    "segment_lengths": [256, 512, 1024],
    "dilation_rates": [1, 2, 4],
    "max_dense_seq": 4096,
    "max_check_seq": 8192,
    "repeats": 5,
    "warmup": 2,
    "min_time": 1.0,
}
CUDA_DEFAULTS = {
    "seq_lens": [8192, 16384, 32768, 65536, 131072],
    "heads": 16,
    "head_dim": 128,
    "dtype": "bfloat16",
    "segment_lengths": [2048, 4096, 8192],
    "dilation_rates": [1, 2, 4],
    "max_dense_seq": 131072,
    "max_check_seq": 32768,
    "repeats": 5,
    "warmup": 3,
    "min_time": 0.5,
}

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="time every installed implementation against dense attention")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seq-lens", type=int_list, help="comma-separated sequence lengths")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int)
    p.add_argument("--head-dim", type=positive_int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--segment-lengths", type=int_list)
    p.add_argument("--dilation-rates", type=int_list)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--repeats", type=positive_int, help="at least this many timed blocks")
    p.add_argument("--warmup", type=non_negative_int, help="untimed calls first")
    p.add_argument(
        "--min-time", type=positive_float, help="seconds of timed calls per cell, at least"
    )
    p.add_argument(
        "--kinds",
        type=name_list,
        help="comma-separated kinds to run (default: every installed one); dense always runs",
    )
    p.add_argument("--max-dense-seq", type=positive_int, help="skip dense attention above this")
    p.add_argument("--max-check-seq", type=positive_int, help="skip the error check above this")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw time vs sequence length (.png when no suffix)"
    )
    p.set_defaults(run=run)


def _fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    for key, value in (CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Full softmax attention over the whole sequence (torch SDPA), the baseline."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    plot = plot_path(args.plot)
    _fill_defaults(args, device)
    ws, rs = branches(args)
    dtype = DTYPES[args.dtype]
    selection = select_implementations(device, args.kinds)
    candidates: dict[str, Callable[..., torch.Tensor]] = {"dense": _dense}
    # Modules of another function (a block-sparse layout) have no error against dilated attention.
    unchecked = {"dense"}
    for impl in selection.run:
        name, module = impl.name, impl.attention(ws, rs)
        candidates[name] = lambda q, k, v, c, m=module: m(q, k, v, is_causal=c)
        if not module.computes_dilated_attention:
            unchecked.add(name)
    rows: list[tuple[object, ...]] = []
    errors = 0
    times: dict[str, list[tuple[int, float]]] = {name: [] for name in candidates}
    with ProgressBar(len(candidates) * len(args.seq_lens), "bench") as bar:
        for n in args.seq_lens:
            inp = make_inputs(
                args.batch,
                n,
                args.heads,
                args.head_dim,
                dtype=dtype,
                device=device,
                requires_grad=args.backward,
                seed=n,
            )
            reference = None
            if n <= args.max_check_seq:
                with torch.no_grad():
                    reference, _ = dilated_attention_reference(
                        inp.q.double(),
                        inp.k.double(),
                        inp.v.double(),
                        ws,
                        rs,
                        scale=args.head_dim**-0.5,
                        is_causal=args.causal,
                    )
            for name, fn in candidates.items():
                bar.update(f"{name} seq={n}")
                if name == "dense" and n > args.max_dense_seq:
                    rows.append(
                        (
                            name,
                            n,
                            f"skipped: above --max-dense-seq {args.max_dense_seq}",
                            "-",
                            "-",
                            "-",
                        )
                    )
                    continue

                def call(
                    fn: Callable[..., torch.Tensor] = fn,
                    q: torch.Tensor = inp.q,
                    k: torch.Tensor = inp.k,
                    v: torch.Tensor = inp.v,
                ) -> torch.Tensor:
                    out = fn(q, k, v, args.causal)
                    if args.backward:
                        out.backward(torch.ones_like(out))
                    return out

                try:
                    timing = timed(call, args.warmup, args.min_time, args.repeats)
                    peak = peak_bytes(call, device)
                    with torch.no_grad():
                        out = fn(inp.q, inp.k, inp.v, args.causal)
                except torch.OutOfMemoryError:
                    rows.append((name, n, "OOM", "-", "-", "-"))
                    torch.cuda.empty_cache()
                    continue
                except ValueError as exc:  # a documented refusal of this input, not a crash
                    rows.append((name, n, f"refused: {exc}", "-", "-", "-"))
                    continue
                except Exception as exc:  # one failing implementation must not end the run
                    rows.append((name, n, f"error: {type(exc).__name__}: {exc}", "-", "-", "-"))
                    errors += 1
                    continue
                err = (
                    "-"
                    if reference is None or name in unchecked
                    else f"{relative_error(out, reference):.1e}"
                )
                times[name].append((n, timing.median))
                tokens = args.batch * n / (timing.median / 1e3)
                memory = "-" if peak is None else _fmt_bytes(peak)
                rows.append((name, n, str(timing), f"{tokens:,.0f}", memory, err))
    what = "forward+backward" if args.backward else "forward"
    print(
        f"device: {device}; {what}; batch {args.batch}, heads {args.heads}, head_dim "
        f"{args.head_dim}, {args.dtype}, segments {list(ws)}, rates {list(rs)}, "
        f"causal {args.causal}; time: median ms (quartiles) of torch.utils.benchmark blocks, "
        f">= {args.min_time} s and >= {args.repeats} blocks per cell after {args.warmup} warm-up calls"
    )
    print(
        "peak mem: "
        + (
            "torch.cuda.max_memory_allocated over one call"
            if device.type == "cuda"
            else "not measured on CPU (PyTorch keeps no CPU allocator statistics)"
        )
        + "; max err: max|out - ref| / max|ref| against the float64 reference "
        "(dense computes another function, so it has none)"
    )
    print(format_table(["impl", "seq", "time ms (q1-q3)", "tokens/s", "peak mem", "max err"], rows))
    print("\n".join(selection.lines("ran")))
    if plot is not None:
        _plot(times, plot, f"{device.type}, {args.dtype}, {what}")
        print(f"plot written to {plot}")
    return 1 if errors else 0


def _plot(times: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt  # present: plot_path checked it before the run

    fig = _figure(times, title)
    # bbox_inches="tight" widens the image to take in the legend beside the axes.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _figure(times: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """The bench plot; its legend sits to the right of the axes, so it covers no point."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in times.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("median time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig
