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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for m in ("reference", "ideal", "flex", "cudnn", "triton"):
            pts = [
                (r["seq"], r["tflops"])
                for r in rows
                if r["mode"] == mode and r["method"] == m and math.isfinite(r["ms"])
            ]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, {data['device']}, bf16")
        ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
