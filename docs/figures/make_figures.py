"""Draw the figures of the docs: ``uv run python docs/figures/make_figures.py``.

``dilation_pattern.png``: for seq 32, 4 heads, segments [8, 16, 32] and rates [1, 2, 4], which
keys (columns) each query (rows) may attend, per branch and head, and how many times each pair
is reached once the branches are merged. Drawn from :func:`dilated.core.testing.branch_mask`,
the same masks the dense reference uses.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap

from dilated.core.testing import branch_mask

SEQ, HEADS = 32, 4
SEGMENTS, RATES = [8, 16, 32], [1, 2, 4]
OUT = Path(__file__).parent


def dilation_pattern(path: Path) -> None:
    rows = len(SEGMENTS) + 1
    fig, axes = plt.subplots(
        rows, HEADS, figsize=(2.4 * HEADS + 1.0, 2.4 * rows), layout="constrained"
    )
    merged = torch.zeros(HEADS, SEQ, SEQ)
    binary = ListedColormap(["#f4f4f4", "#3949ab"])
    # One colour per count, so that "reached twice" reads as clearly as "reached once".
    counts = ListedColormap(["#f4f4f4", "#9fa8da", "#3949ab", "#1a237e"][: len(SEGMENTS) + 1])
    for i, (w, r) in enumerate(zip(SEGMENTS, RATES)):
        mask = branch_mask(SEQ, HEADS, w, r)
        merged += mask.float()
        for j in range(HEADS):
            ax = axes[i, j]
            ax.imshow(mask[j].numpy(), cmap=binary, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"w={w}, r={r}, head {j} (phase {j % r})", fontsize=8)
    for j in range(HEADS):
        ax = axes[-1, j]
        im = ax.imshow(
            merged[j].numpy(),
            cmap=counts,
            vmin=-0.5,
            vmax=len(SEGMENTS) + 0.5,
            interpolation="nearest",
        )
        ax.set_title(f"merged, head {j}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([0, 8, 16, 24, 31])
        ax.set_yticks([0, 8, 16, 24, 31])
        ax.tick_params(labelsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("query t", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("key u", fontsize=8)
    bar = fig.colorbar(
        im, ax=axes, shrink=0.25, anchor=(0.0, 0.0), label="branches reaching (t, u)"
    )
    bar.set_ticks(range(len(SEGMENTS) + 1))
    fig.suptitle(
        "Dilated attention: seq 32, 4 heads, segments [8, 16, 32], rates [1, 2, 4]", fontsize=11
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    dilation_pattern(OUT / "dilation_pattern.png")
    print(f"wrote {OUT / 'dilation_pattern.png'}")
