"""Draw the figures of the docs: ``uv run python docs/figures/make_figures.py``.

``dilation_pattern.png``: for seq 32, 4 heads, segments [8, 16, 32] and rates [1, 2, 4], which
keys (columns) each query (rows) may attend, per branch and head, and how many times each pair
is reached once the branches are merged. Drawn from ``dilated.core.testing.branch_mask``,
the same masks the dense reference uses.

``reference_vs_dense.png``: the ``dilated bench`` medians of the Benchmarks page
(``bench_reference.json``), dense attention against the plain-PyTorch reference, on CPU and H100.

``ring_traffic.png``: what travels between ranks in dilated-ring's ``"ring"`` strategy, for
seq 32 over 4 ranks (contiguous shards of 8) and the branches (8, 1) and (32, 4): the local
branch sends nothing; for the spanning one, the heads of phase ``p`` read only the keys at
``t = p (mod 4)``, so each rank passes only those rows of its K and V around the ring, forward,
and the same rows with their dK/dV in the backward pass.

``sparse_layouts.png``: the block layouts of dilated-sparse (one table of 16 x 16 blocks each),
and under each the token mask it gives one branch (seq 64, w 32, r 2, head 1, 2 rows per block),
from ``dilated.core.sparsity.resolve_layouts`` and ``dilated.core.testing.sparse_branch_mask``,
the judge's own masks.

``sparse_h200.png``: the sparse efficiency of dilated-sparse's layouts (dense-layout time x
density / sparse time) against density at 256K tokens on an H200, eager and replayed from a CUDA
graph, forward and forward+backward, with the 1M-token forward and the issue's targets, from
``sparse_h200_256k.json``, ``sparse_h200_256k_cuda_graph.json`` and
``sparse_h200_1m_cuda_graph.json`` (written by ``benchmarks/sparse.py --out``).

``architecture.png``: the five packages, what each depends on, and the path of one call of
the op on a GPU through the layers (module, functional op, backend, plan, engines, merge).

``sparsity_ratio.png``: the density of ``"local_window"`` against ``W`` for a few ``nb``, and
the ``W`` that ``sparsity_ratio`` picks (the first density at or above the ratio).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import FancyArrowPatch, Rectangle

from dilated.core import SparsePatternConfig
from dilated.core.sparsity import choose_window, resolve_layouts, window_block_count
from dilated.core.testing import branch_mask, sparse_branch_mask

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


def reference_vs_dense(path: Path) -> None:
    panels = json.loads((OUT / "bench_reference.json").read_text())["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3.8), layout="constrained")
    for ax, panel in zip(axes, panels):
        for name, marker in (("dense", "s"), ("standard", "o")):
            points = [(n, ms) for n, ms in zip(panel["seq"], panel[name]) if ms is not None]
            xs, ys = zip(*points)
            label = "dense (SDPA, whole sequence)" if name == "dense" else "standard (reference)"
            ax.plot(xs, ys, marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("median forward time (ms)")
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


RING_SEQ, RANKS = 32, 4
RING_BRANCHES = [(8, 1), (32, 4)]
RANK_COLOURS = ["#c5cae9", "#c8e6c9", "#ffe0b2", "#f8bbd0"]
SENT_COLOURS = ["#283593", "#2e7d32", "#ef6c00", "#ad1457"]


def _shard_rows(ax: plt.Axes, y: float, sent: list[bool], label: str) -> None:
    """One row of RING_SEQ cells, coloured by owning rank; the sent ones dark."""
    shard = RING_SEQ // RANKS
    for u in range(RING_SEQ):
        rank = u // shard
        colour = SENT_COLOURS[rank] if sent[u] else RANK_COLOURS[rank]
        ax.add_patch(Rectangle((u, y), 0.92, 0.8, color=colour, linewidth=0))
    ax.text(-0.6, y + 0.4, label, ha="right", va="center", fontsize=8)


def ring_traffic(path: Path) -> None:
    shard = RING_SEQ // RANKS
    fig, (top, ring) = plt.subplots(
        2, 1, figsize=(9.5, 7.0), height_ratios=[1.25, 1.0], layout="constrained"
    )
    rows: list[tuple[list[bool], str]] = []
    for w, r in RING_BRANCHES:
        if w <= shard:
            rows.append(([False] * RING_SEQ, f"branch ({w}, {r}): local, sends nothing"))
            continue
        for phase in range(r):
            sent = [u % r == phase for u in range(RING_SEQ)]
            rows.append((sent, f"branch ({w}, {r}), heads of phase {phase}"))
    for i, (sent, label) in enumerate(rows):
        _shard_rows(top, len(rows) - 1 - i, sent, label)
    for rank in range(RANKS):
        top.text(
            rank * shard + shard / 2,
            len(rows) + 0.2,
            f"rank {rank} (positions {rank * shard}-{(rank + 1) * shard - 1})",
            ha="center",
            fontsize=8,
        )
    top.set_xlim(-0.2, RING_SEQ + 0.2)
    top.set_ylim(-0.3, len(rows) + 0.8)
    top.set_xticks(range(0, RING_SEQ, 4))
    top.set_yticks([])
    top.set_xlabel("key/value position t (dark: the rows a rank sends for those heads)", fontsize=8)
    for side in ("left", "right", "top"):
        top.spines[side].set_visible(False)
    top.set_title(
        "Per spanning branch, each rank sends only the phase rows of its K and V: 1/r of its shard",
        fontsize=10,
    )

    centres = [(0.0, 1.0), (1.0, 0.0), (0.0, -1.0), (-1.0, 0.0)]
    for rank, (x, y) in enumerate(centres):
        ring.add_patch(
            Rectangle((x - 0.28, y - 0.17), 0.56, 0.34, color=RANK_COLOURS[rank], zorder=2)
        )
        ring.text(x, y, f"rank {rank}", ha="center", va="center", fontsize=9, zorder=3)
    for rank in range(RANKS):
        (x0, y0), (x1, y1) = centres[rank], centres[(rank + 1) % RANKS]
        for bend, style, colour in ((0.25, "-|>", "#283593"), (-0.25, "-|>", "#9e9e9e")):
            ring.add_patch(
                FancyArrowPatch(
                    (x0, y0),
                    (x1, y1),
                    connectionstyle=f"arc3,rad={bend}",
                    arrowstyle=style,
                    mutation_scale=14,
                    color=colour,
                    shrinkA=22,
                    shrinkB=22,
                    linewidth=1.6,
                )
            )
    ring.plot([], [], color="#283593", label="forward: each step passes the block it holds on")
    ring.plot(
        [], [], color="#9e9e9e", label="backward: the block travels again, carrying its dK/dV"
    )
    ring.legend(loc="center left", bbox_to_anchor=(0.62, 0.5), fontsize=8, frameon=False)
    ring.set_xlim(-1.6, 3.6)
    ring.set_ylim(-1.45, 1.4)
    ring.set_aspect("equal")
    ring.axis("off")
    ring.set_title(
        f"{RANKS - 1} steps: every rank has seen the phase rows of the whole segment; the next "
        "transfer overlaps the current block's compute",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


SPARSE_LAYOUTS = {
    "dense": SparsePatternConfig("dense", block_size=1),
    "local_window, W=2": SparsePatternConfig("local_window", local_window_size=2, block_size=1),
    "global_local, G=2, W=1": SparsePatternConfig(
        "global_local", local_window_size=1, global_tokens=2, block_size=1
    ),
    "dilated_sparse": SparsePatternConfig("dilated_sparse", block_size=1),
    "custom: b <= a, a - b < 4": SparsePatternConfig(
        "custom", block_size=1, layout=lambda a, b: (b <= a) & (a - b < 4)
    ),
}


def sparse_layouts(path: Path) -> None:
    cols = len(SPARSE_LAYOUTS)
    fig, axes = plt.subplots(2, cols, figsize=(2.5 * cols, 5.4), layout="constrained")
    binary = ListedColormap(["#f4f4f4", "#3949ab"])
    seq, w, r, block, head = 64, 32, 2, 2, 1
    for j, (name, cfg) in enumerate(SPARSE_LAYOUTS.items()):
        (table,) = resolve_layouts(cfg, [16], [1])
        ax = axes[0, j]
        ax.imshow(table.blocks.numpy(), cmap=binary, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\ndensity {table.density:.2f}", fontsize=8)
        ax.set_xlabel("key block b", fontsize=7)
        # The same rule on the rows of one branch: 16 rows per segment, blocks of 2 rows.
        (lay,) = resolve_layouts(
            SparsePatternConfig(
                cfg.pattern_type,
                block_size=block,
                local_window_size=None
                if cfg.local_window_size is None
                else cfg.local_window_size * block,
                global_tokens=None if cfg.global_tokens is None else cfg.global_tokens * block,
                layout=cfg.layout,
            ),
            [w],
            [r],
        )
        mask = sparse_branch_mask(seq, 2, w, r, lay.blocks, block)[head]
        ax = axes[1, j]
        ax.imshow(mask.numpy(), cmap=binary, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"w={w}, r={r}, head {head}, B={block} rows", fontsize=8)
        ax.set_xlabel("key u", fontsize=7)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("query block a", fontsize=8)
    axes[1, 0].set_ylabel("query t", fontsize=8)
    fig.suptitle(
        "Block layouts (top: 16 x 16 blocks) and the token mask of one branch", fontsize=11
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def sparsity_ratio(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
    for nb in (8, 16, 32, 64):
        ws = list(range(nb))
        ax.plot(ws, [window_block_count(nb, w) / nb**2 for w in ws], marker=".", label=f"nb={nb}")
    for ratio in (0.1, 0.25, 0.5):
        ax.axhline(ratio, color="#999999", lw=0.8, ls="--")
        picks = ", ".join(f"{choose_window(nb, ratio)}" for nb in (8, 16, 32, 64))
        ax.text(40, ratio + 0.01, f"ratio {ratio}: W = {picks}", fontsize=7)
    ax.set_xlim(0, 63)
    ax.set_xlabel("window W (blocks on each side)")
    ax.set_ylabel("fraction of nb x nb blocks kept")
    ax.set_title(
        "local_window: density against W (sparsity_ratio picks the first W above it)", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def sparse_h200(path: Path) -> None:
    def rows(name: str) -> list[dict[str, object]]:
        return json.loads((OUT / name).read_text())["rows"]  # type: ignore[no-any-return]

    runs = {
        "eager, no rows kernel": rows("sparse_h200_256k.json"),
        "CUDA graph, no rows kernel": rows("sparse_h200_256k_cuda_graph.json"),
    }
    million = rows("sparse_h200_1m_cuda_graph.json")
    rows_kernel = rows("sparse_h200_256k_rows_kernel.json")
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained", sharey=True)
    for ax, layout in zip(axes, ("local_window", "global_local")):
        for (label, data), color in zip(runs.items(), ("#d62728", "#1f77b4")):
            for mode, style in (("fwd", "-"), ("fwd+bwd", ":")):
                pts = sorted(
                    (float(r["density"]), float(r["efficiency"]))  # type: ignore[arg-type]
                    for r in data
                    if r["layout"] == layout and r["mode"] == mode
                )
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{mode}, {label}")
        if layout == "local_window":
            pts = sorted(
                (float(r["density"]), float(r["efficiency"]))  # type: ignore[arg-type]
                for r in million
                if r["mode"] == "fwd"
            )
            ax.plot(
                *zip(*pts),
                "--",
                marker="s",
                color="#2ca02c",
                label="fwd, CUDA graph, 1M, no rows kernel",
            )
        for mode, style, key in (
            ("fwd", "-", "fwd_eager_eff"),
            ("fwd+bwd", ":", "fwdbwd_eager_eff"),
        ):
            pts = sorted(
                (float(r["density"]), float(r[key]))  # type: ignore[arg-type]
                for r in rows_kernel
                if r["layout"] == layout and r["rows_kernel"] == "on"
            )
            ax.plot(
                *zip(*pts), style, marker="D", color="#9467bd", label=f"{mode}, eager, rows kernel"
            )
        ax.step([0.1, 0.25, 0.55], [0.6, 0.8, 0.8], where="post", color="#555555", lw=1.0)
        ax.text(0.26, 0.82, "target", fontsize=7, color="#555555")
        ax.axhline(1.0, color="#bbbbbb", lw=0.8)
        ax.set_xlim(0.1, 0.55)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("density (kept fraction of the dense layout's work)")
        ax.set_title(f"{layout}, 256K tokens", fontsize=9)
    axes[0].set_ylabel("sparse efficiency")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=3)
    fig.suptitle("dilated-sparse on one H200, bf16, 16 heads x 128, blocks of 128", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _box(ax: plt.Axes, x: float, y: float, w: float, h: float, title: str, body: str,
         color: str) -> None:  # fmt: skip
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="#333", lw=1.0))
    ax.text(x + w / 2, y + h - 0.12, title, ha="center", va="top", fontsize=9, weight="bold")
    if body:
        ax.text(x + w / 2, y + h - 0.42, body, ha="center", va="top", fontsize=7.2)


def _arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float],
           label: str = "") -> None:  # fmt: skip
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, lw=1.0,
                                 color="#333"))  # fmt: skip
    if label:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx + 0.08, my, label, fontsize=6.8, va="center", color="#444")


def architecture(path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 6.2), width_ratios=[1, 1.25])
    for ax in (left, right):
        ax.set_xlim(0, 6)
        ax.set_ylim(0, 7.4)
        ax.axis("off")
    left.set_title("Packages: each depends only on those below it", fontsize=10)
    packages = [
        (
            0.3,
            5.7,
            "dilated-sparse",
            "block-sparse layouts' op, alone\nand over the ring's schedules",
        ),
        (
            0.3,
            4.2,
            "dilated-ring",
            "sequence parallelism: plan, one block\nbody, one file per schedule",
        ),
        (3.2, 4.2, "dilated-longnet", "layers, LongNet(LM), KV cache,\ngeneration, transformers"),
        (
            0.3,
            2.7,
            "dilated-kernels",
            "backends, dense engines, the\nsub-problem primitive, Triton",
        ),
        (
            0.3,
            0.6,
            "dilated-core",
            "configs, checks, reference, merge,\nregistry, CLI, the dense judge",
        ),
    ]
    colors = ["#f3d9fa", "#d0ebff", "#fff3bf", "#d3f9d8", "#e9ecef"]
    for (x, y, title, body), color in zip(packages, colors):
        _box(left, x, y, 2.6, 1.15, title, body, color)
    _arrow(left, (1.6, 5.7), (1.6, 5.35))
    _arrow(left, (1.6, 4.2), (1.6, 3.85))
    _arrow(left, (1.6, 2.7), (1.6, 1.75))
    _arrow(left, (4.5, 4.2), (2.9, 1.75), "kernels optional")
    right.set_title("One call on a GPU, layer by layer", fontsize=10)
    steps = [
        ("module", "ImprovedMultiheadDilatedAttention: projections,\nthen the functional op"),
        (
            "functional op",
            "dilated.kernels.dilated_attention: dilated.core.checks\n(one validation module), then choose_backend",
        ),
        (
            "backend",
            "strided sub-problem backend (backends/cudnn.py):\none custom op, forward and backward",
        ),
        (
            "plan",
            "strided_plan: the engine calls of this shape (cached);\nphases share calls where strides allow",
        ),
        (
            "engines",
            "subproblem_attention -> choose_engine ->\nflash4 | cudnn | sdpa_flash | reference",
        ),
        ("merge", "one Triton pass: every branch merged by LSE,\nout and lse written once"),
    ]
    y = 6.3
    for i, (title, body) in enumerate(steps):
        _box(right, 0.4, y, 5.2, 0.95, title, body, "#f8f9fa" if i % 2 else "#e7f5ff")
        if i:
            _arrow(right, (3.0, y + 1.25), (3.0, y + 0.95))
        y -= 1.25
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    for name, draw in (
        ("dilation_pattern.png", dilation_pattern),
        ("reference_vs_dense.png", reference_vs_dense),
        ("ring_traffic.png", ring_traffic),
        ("sparse_layouts.png", sparse_layouts),
        ("sparsity_ratio.png", sparsity_ratio),
        ("sparse_h200.png", sparse_h200),
        ("architecture.png", architecture),
    ):
        draw(OUT / name)
        print(f"wrote {OUT / name}")
