"""Block layouts of block-sparse dilated attention: one bool ``(nb, nb)`` table per branch.

In branch ``(w, r)`` a segment's positions of one phase are the rows ``0 .. w / r - 1`` of a
dense sub-problem; with ``block_size`` ``B`` they form ``nb = ceil((w / r) / B)`` blocks, and
query row ``m`` may attend key row ``m'`` only when ``layout[m // B, m' // B]`` is True (on top
of the dilated rules: same phase, same segment, causality, key padding). A shorter last segment
uses the top-left corner of its branch's table. [`resolve_layouts`][dilated.core.sparsity.resolve_layouts]
turns a [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig] into these tables,
choosing each branch's window from ``sparsity_ratio``; the dense judge of
[`dilated.core.testing`][dilated.core.testing] and dilated-sparse's engine both read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dilated.core.checks import check_branches

if TYPE_CHECKING:  # config.py imports this module (for describe()); no import circle at run time
    from dilated.core.config import SparsePatternConfig

__all__ = [
    "BranchLayout",
    "block_count",
    "choose_window",
    "describe_layouts",
    "layout_blocks",
    "resolve_layouts",
    "window_block_count",
]


def block_count(segment_length: int, dilation_rate: int, block_size: int) -> int:
    """``nb = ceil((w / r) / B)``: blocks of a full segment's sub-problem."""
    return -(-(segment_length // dilation_rate) // block_size)


def window_block_count(nb: int, window: int, global_blocks: int = 0) -> int:
    """Blocks kept by ``a < G or b < G or |a - b| <= W`` on an ``nb x nb`` table (``G = 0``:
    the plain band), counted without building the table."""
    w = min(max(window, 0), nb - 1)
    band = nb + 2 * (w * nb - w * (w + 1) // 2)
    g = min(global_blocks, nb)
    if g == 0:
        return band
    # The band restricted to the non-global corner [G, nb) x [G, nb) is itself a band of
    # nb - G blocks; everything else is global.
    rest = nb - g
    inner = 0 if rest == 0 else window_block_count(rest, w)
    return nb * nb - rest * rest + inner


def choose_window(nb: int, ratio: float, global_blocks: int = 0) -> int:
    """The smallest ``W >= 0`` whose layout keeps at least ``ratio * nb * nb`` blocks."""
    need = ratio * nb * nb
    lo, hi = 0, max(nb - 1, 0)
    while lo < hi:  # the count grows with W: binary search
        mid = (lo + hi) // 2
        if window_block_count(nb, mid, global_blocks) >= need - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _power_of_two(x: torch.Tensor) -> torch.Tensor:
    return (x > 0) & ((x & (x - 1)) == 0)


def _layout_value_kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _call_layout(fn: object, nb: int) -> torch.Tensor:
    """Evaluate a custom ``(a, b) -> bool`` on every block pair of ``nb x nb``.

    Rule: called on broadcast long tensors ``a`` ``(nb, 1)`` and ``b`` ``(1, nb)`` the function
    returns a bool tensor broadcastable to ``(nb, nb)`` or a bool; when that call raises (a
    function written for ints, with ``and``/``or``), it is called on every pair of ints and
    returns a bool (or a one-element bool tensor) each time. Anything else (None, numbers, a
    float tensor) raises ``ValueError`` naming ``layout``: truth-testing it would silently turn
    a mistake into a layout (None into no block at all).
    """
    assert callable(fn)
    a = torch.arange(nb)[:, None]
    b = torch.arange(nb)[None, :]
    try:
        got = fn(a, b)
    except Exception:  # a scalar-only function (uses `and`/`or`): evaluate pair by pair
        return torch.tensor(
            [[_scalar_layout_value(fn(i, j), i, j) for j in range(nb)] for i in range(nb)],
            dtype=torch.bool,
        ).reshape(nb, nb)
    if isinstance(got, bool):
        return torch.full((nb, nb), got)
    if isinstance(got, torch.Tensor) and got.dtype == torch.bool:
        try:
            return got.detach().to("cpu").broadcast_to(nb, nb).clone()
        except RuntimeError:
            pass
    raise ValueError(
        "layout function (a, b) -> bool, called on block numbers a (nb, 1) and b (1, nb) with "
        f"nb={nb}, must return a bool tensor broadcastable to ({nb}, {nb}) or a bool, got "
        f"{_layout_value_kind(got)}"
    )


def _scalar_layout_value(value: object, a: int, b: int) -> bool:
    """One block pair's answer of a scalar-only layout function: a bool, nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise ValueError(
        f"layout function (a, b) -> bool must return a bool, got {_layout_value_kind(value)} "
        f"for blocks (a, b) = ({a}, {b})"
    )


def layout_blocks(
    pattern_type: str,
    nb: int,
    *,
    window: int = 0,
    global_blocks: int = 0,
    custom: object = None,
    branch: int = 0,
) -> torch.Tensor:
    """The bool ``(nb, nb)`` table of one branch: True where query block ``a`` sees key block ``b``.

    ``custom`` is the config's normalised ``layout`` (a tensor, a tuple of per-branch tensors or
    a function); ``branch`` picks from a tuple. Raises ``ValueError`` for a custom table that is
    smaller than ``nb`` or a per-branch table of another size.
    """
    a = torch.arange(nb)[:, None]
    b = torch.arange(nb)[None, :]
    dist = (a - b).abs()
    if pattern_type == "dense":
        return torch.ones(nb, nb, dtype=torch.bool)
    if pattern_type == "local_window":
        return dist <= window
    if pattern_type == "global_local":
        return (a < global_blocks) | (b < global_blocks) | (dist <= window)
    if pattern_type == "dilated_sparse":
        return (dist == 0) | _power_of_two(dist)
    if pattern_type != "custom":
        raise ValueError(f"unknown pattern_type {pattern_type!r}")
    if isinstance(custom, tuple):
        table: torch.Tensor = custom[branch]
        if table.shape[0] != nb:
            raise ValueError(
                f"layout[{branch}] must have shape ({nb}, {nb}) for branch {branch} "
                f"(nb = ceil((w / r) / block_size)), got {tuple(table.shape)}"
            )
        return table
    if isinstance(custom, torch.Tensor):
        if custom.shape[0] < nb:
            raise ValueError(
                f"layout must be at least ({nb}, {nb}) to cover branch {branch} "
                f"(nb = ceil((w / r) / block_size)), got {tuple(custom.shape)}"
            )
        return custom[:nb, :nb]
    return _call_layout(custom, nb)


@dataclass(frozen=True)
class BranchLayout:
    """The block layout of one branch ``(w, r)``.

    Attributes:
        segment_length, dilation_rate: the branch.
        rows: rows of a full segment's sub-problem, ``w / r``.
        nb: blocks of it, ``ceil(rows / block_size)``.
        window: ``W`` (None for layouts without a window).
        global_blocks: ``G`` (None unless ``"global_local"``).
        blocks: bool ``(nb, nb)`` on the CPU.
    """

    segment_length: int
    dilation_rate: int
    rows: int
    nb: int
    window: int | None
    global_blocks: int | None
    blocks: torch.Tensor

    @property
    def density(self) -> float:
        """Fraction of the ``nb * nb`` blocks kept."""
        return float(self.blocks.sum()) / (self.nb * self.nb)


def resolve_layouts(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[BranchLayout, ...]:
    """Every branch's [`BranchLayout`][dilated.core.sparsity.BranchLayout] under ``config``.

    The window of ``"local_window"``/``"global_local"`` is ``local_window_size // block_size``
    when given, else the smallest ``W`` keeping ``sparsity_ratio`` of the branch's blocks.
    """
    ws, rs = check_branches(segment_lengths, dilation_rates)
    custom = config.layout
    if isinstance(custom, tuple) and len(custom) != len(ws):
        raise ValueError(
            f"layout has {len(custom)} tables but there are {len(ws)} branches: give one "
            "(nb_i, nb_i) table per branch or a single one for all"
        )
    out = []
    for i, (w, r) in enumerate(zip(ws, rs)):
        nb = block_count(w, r, config.block_size)
        window: int | None = None
        global_blocks: int | None = None
        if config.pattern_type == "global_local":
            global_blocks = config.global_blocks
        if config.pattern_type in ("local_window", "global_local"):
            ratio = config.ratio
            fixed = config.window_blocks
            window = fixed if ratio is None else choose_window(nb, ratio, global_blocks or 0)
        blocks = layout_blocks(
            config.pattern_type,
            nb,
            window=window or 0,
            global_blocks=global_blocks or 0,
            custom=custom,
            branch=i,
        )
        out.append(BranchLayout(w, r, w // r, nb, window, global_blocks, blocks))
    return tuple(out)


def describe_layouts(config: SparsePatternConfig, layouts: Sequence[BranchLayout]) -> str:
    """A small table: one line per branch with its rows, ``nb``, ``W``, ``G`` and density."""
    head = f"{config.pattern_type} layout, block_size={config.block_size} rows"
    if config.ratio is not None:
        head += f", sparsity_ratio={config.ratio:g} (W picked per branch)"
    lines = [head]
    for lay in layouts:
        w = "-" if lay.window is None else str(lay.window)
        g = "-" if lay.global_blocks is None else str(lay.global_blocks)
        lines.append(
            f"  w={lay.segment_length} r={lay.dilation_rate}: rows={lay.rows} nb={lay.nb} "
            f"W={w} G={g} density={lay.density:.3f}"
        )
    return "\n".join(lines)
