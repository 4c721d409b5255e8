"""Draw docs/figures/kernels_h100.png from the JSON written by benchmarks/kernels.py."""

from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> None:
    with open(src) as f:
        data = json.load(f)
    # One curve per method: plain MHA rows of one causal setting (the first row's), since the
    # JSON of benchmarks/kernels.py may hold several features and both causal settings.
    rows = [r for r in data["rows"] if r.get("feature", "mha") == "mha"]
    causal = rows[0].get("causal", data.get("causal", False)) if rows else False
    rows = [r for r in rows if r.get("causal", data.get("causal", False)) == causal]
    # Log axes: reference and flex (measured at 32K only) run at ~10-20 TFLOP/s against ~600 for
    # ideal, so on a linear axis they were single points on the floor.
    methods = ("reference", "ideal", "flex", "cudnn", "triton")
    colors = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in both panels
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for m in methods:
            pts = [
                (r["seq"], r["tflops"])
                for r in rows
                if r["mode"] == mode and r["method"] == m and math.isfinite(r["ms"])
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=colors[m], label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("sequence length")
        ax.set_title(f"{mode}, {data['device']}, bf16")
    axes[0].set_ylabel("TFLOP/s (log)")
    # One legend for both panels, below them: inside an axes it would cover points.
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend(
        [handles[m] for m in methods if m in handles],
        [m for m in methods if m in handles],
        loc="lower center",
        ncol=len(handles),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
