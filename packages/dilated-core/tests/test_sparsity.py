"""SparsePatternConfig, the block layouts and the dense block-sparse judge."""

from __future__ import annotations

import pytest
import torch

from dilated.core import SparseAttentionConfig, SparsePatternConfig
from dilated.core.sparsity import (
    block_count,
    choose_window,
    layout_blocks,
    resolve_layouts,
    window_block_count,
)
from dilated.core.testing import (
    branch_mask,
    dense_block_sparse_attention,
    dense_dilated_attention,
    make_inputs,
    sparse_branch_mask,
)


def test_alias_is_one_class() -> None:
    assert SparseAttentionConfig is SparsePatternConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -3}, "block_size"),
        ({"pattern_type": "strided"}, "pattern_type"),
        ({"local_window_size": -1}, "local_window_size"),
        ({"sparsity_ratio": 0.0}, "sparsity_ratio"),
        ({"sparsity_ratio": 1.5}, "sparsity_ratio"),
        ({"sparsity_ratio": 0.5, "local_window_size": 256}, "sparsity_ratio"),
        ({"pattern_type": "dense", "sparsity_ratio": 0.5}, "sparsity_ratio"),
        ({"pattern_type": "dilated_sparse", "local_window_size": 8}, "local_window_size"),
        ({"pattern_type": "global_local", "global_tokens": -1}, "global_tokens"),
        ({"pattern_type": "global_local", "global_tokens": 0}, "global_tokens"),
        ({"pattern_type": "local_window", "global_tokens": 4}, "global_tokens"),
        ({"pattern_type": "custom"}, "layout"),
        ({"pattern_type": "custom", "layout": torch.ones(2, 3, dtype=torch.bool)}, "layout"),
        ({"pattern_type": "custom", "layout": torch.ones(2, 2)}, "layout"),
        ({"pattern_type": "custom", "layout": [torch.ones(2, 2, dtype=torch.bool), 3]}, "layout"),
        ({"pattern_type": "custom", "layout": "diagonal"}, "layout"),
        ({"pattern_type": "dense", "layout": torch.ones(2, 2, dtype=torch.bool)}, "layout"),
    ],
)
def test_bad_configs_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SparsePatternConfig(**kwargs)  # type: ignore[arg-type]


def test_custom_layout_of_the_wrong_size_is_named_at_resolve() -> None:
    small = SparsePatternConfig("custom", block_size=4, layout=torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"layout must be at least \(4, 4\)"):
        resolve_layouts(small, [16], [1])
    per_branch = SparsePatternConfig(
        "custom",
        block_size=4,
        layout=[torch.eye(4, dtype=torch.bool), torch.eye(3, dtype=torch.bool)],
    )
    with pytest.raises(ValueError, match=r"layout\[1\] must have shape \(2, 2\)"):
        resolve_layouts(per_branch, [16, 16], [1, 2])
    with pytest.raises(ValueError, match="2 tables but there are 1 branches"):
        resolve_layouts(per_branch, [16], [1])


@pytest.mark.parametrize(
    ("function", "got"),
    [
        (lambda a, b: None, "NoneType None"),  # a forgotten return: no block at all before
        (lambda a, b: 1.0 * (a == b), "torch.float32 tensor"),  # floats were truth-tested
        (lambda a, b: a - b, "torch.int64 tensor"),
        (lambda a, b: torch.ones(2, 2, dtype=torch.bool), r"shape \(2, 2\)"),
        (lambda a, b: 1 if a == b or b == 0 else 0, r"int 1 for blocks \(a, b\) = \(0, 0\)"),
        (lambda a, b: a == b or None, r"NoneType None for blocks \(a, b\) = \(0, 1\)"),
    ],
)
def test_custom_layout_function_must_return_bools(function: object, got: str) -> None:
    """A custom layout function's answers are bools, checked before any attention runs."""
    cfg = SparsePatternConfig("custom", block_size=2, layout=function)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^layout function \(a, b\) -> bool.*{got}"):
        resolve_layouts(cfg, [8], [1])


def test_custom_layout_function_broadcasts_bool_answers() -> None:
    """Bool answers of any broadcastable shape, or one bool, fill the (nb, nb) table."""
    rows = layout_blocks("custom", 3, custom=lambda a, b: a < 1)
    assert rows.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert layout_blocks("custom", 2, custom=lambda a, b: True).all()
    one = layout_blocks("custom", 2, custom=lambda a, b: torch.tensor(a == b) if a < 2 else 0)
    assert one.tolist() == [[True, False], [False, True]]


def test_config_is_frozen_and_copies_its_layout() -> None:
    table = torch.eye(3, dtype=torch.bool)
    cfg = SparsePatternConfig("custom", layout=table)
    table[0, 1] = True
    assert isinstance(cfg.layout, torch.Tensor) and not bool(cfg.layout[0, 1])
    with pytest.raises(AttributeError):
        cfg.block_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("nb", [1, 2, 5, 16])
@pytest.mark.parametrize("g", [0, 1, 3])
def test_window_count_is_the_table_count(nb: int, g: int) -> None:
    for w in range(nb + 2):
        table = layout_blocks("global_local", nb, window=w, global_blocks=g)
        assert int(table.sum()) == window_block_count(nb, w, g)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("nb", [1, 7, 32])
def test_sparsity_ratio_picks_the_smallest_window(ratio: float, nb: int) -> None:
    w = choose_window(nb, ratio)
    assert window_block_count(nb, w) >= ratio * nb * nb
    if w > 0:
        assert window_block_count(nb, w - 1) < ratio * nb * nb


def test_layout_rules_by_hand() -> None:
    lw = layout_blocks("local_window", 4, window=1)
    assert lw.tolist() == [
        [True, True, False, False],
        [True, True, True, False],
        [False, True, True, True],
        [False, False, True, True],
    ]
    gl = layout_blocks("global_local", 4, window=0, global_blocks=1)
    assert gl[0].all() and gl[:, 0].all() and not bool(gl[1, 2]) and bool(gl[2, 2])
    ds = layout_blocks("dilated_sparse", 6)
    assert ds[0].tolist() == [True, True, True, False, True, False]  # 0, 1, 2, 4 apart
    assert bool(ds[5, 1]) and not bool(ds[5, 0])  # 4 apart yes, 5 apart no
    fn = layout_blocks("custom", 3, custom=lambda a, b: a == b or b == 0)
    assert fn.tolist() == [[True, False, False], [True, True, False], [True, False, True]]


def test_resolve_and_describe() -> None:
    cfg = SparsePatternConfig("local_window", sparsity_ratio=0.3, block_size=4)
    layouts = resolve_layouts(cfg, [32, 64], [1, 4])
    assert [lay.nb for lay in layouts] == [block_count(32, 1, 4), block_count(64, 4, 4)] == [8, 4]
    for lay in layouts:
        assert lay.window is not None and lay.density >= 0.3
    text = cfg.describe([32, 64], [1, 4])
    assert "nb=8" in text and f"W={layouts[0].window}" in text and "density=" in text
    fixed = SparsePatternConfig("global_local", local_window_size=9, global_tokens=5, block_size=4)
    (lay,) = resolve_layouts(fixed, [32], [1])
    assert (lay.window, lay.global_blocks) == (2, 2)


def test_sparse_mask_uses_sub_problem_rows() -> None:
    # w=8, r=2, block 2 rows: head 1 (phase 1) has rows m = 0..3 at t = 1, 3, 5, 7 of segment 0;
    # blocks a = m // 2. A diagonal layout keeps (t, u) in the same block of rows only.
    mask = sparse_branch_mask(16, 2, 8, 2, torch.eye(2, dtype=torch.bool), 2)
    allowed = {u for u in range(16) if mask[1, 5, u]}
    assert allowed == {5, 7}  # t=5 is row 2 (block 1), with t=7 (row 3)
    assert {u for u in range(16) if mask[0, 2, u]} == {0, 2}  # phase 0, row 1, block 0
    assert {u for u in range(16) if mask[1, 13, u]} == {13, 15}  # second segment
    dense = sparse_branch_mask(16, 2, 8, 2, torch.ones(2, 2, dtype=torch.bool), 2)
    assert torch.equal(dense, branch_mask(16, 2, 8, 2))


@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_layout_judge_is_the_dilated_judge(is_causal: bool) -> None:
    x = make_inputs(2, 19, 4, 8, kv_heads=2, padding=True, seed=3, dtype=torch.float64)
    ws, rs = [4, 8], [1, 2]
    cfg = SparsePatternConfig("dense", block_size=2)
    got = dense_block_sparse_attention(
        x.q,
        x.k,
        x.v,
        ws,
        rs,
        sparse_config=cfg,
        is_causal=is_causal,
        key_padding_mask=x.key_padding_mask,
    )
    want = dense_dilated_attention(
        x.q, x.k, x.v, ws, rs, is_causal=is_causal, key_padding_mask=x.key_padding_mask
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_judge_leaves_uncovered_rows_empty() -> None:
    # Only block 0 attends anything: rows of block 1 are covered by no branch.
    table = torch.tensor([[True, False], [False, False]])
    cfg = SparsePatternConfig("custom", block_size=2, layout=table)
    x = make_inputs(1, 8, 2, 4, dtype=torch.float64, requires_grad=True, seed=0)
    out, lse = dense_block_sparse_attention(x.q, x.k, x.v, [4], [1], sparse_config=cfg)
    rows = torch.tensor([2, 3, 6, 7])
    assert torch.equal(out[0, rows], torch.zeros_like(out[0, rows]))
    assert torch.isinf(lse[0, :, rows]).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (x.q, x.k, x.v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
