"""flash-attn-4's block tables of a run, expanded back to the pairs the kernel would compute.

The expansion is the CPU stand-in's (``fa4_emulator.allowed_pairs``: full blocks every pair,
partial ones the element rule read from the aux tensors, nothing else), compared with the rule
itself: ``table[i // B, j // B]``, ``j <= i`` when causal, the key mask. Kernel blocks of 8 or
16 rows stand in for flash-attn-4's 128, so that small tables have many blocks.
"""

from __future__ import annotations

import fa4_emulator
import pytest
import torch

from dilated.kernels.flash4_masks import KEEP_PER_BATCH, ElementMask
from dilated.sparse import flash4_path
from dilated.sparse.block_tables import (
    EMPTY,
    FULL,
    PARTIAL,
    block_classes,
    kept_lists,
    key_states,
    lists_of,
    refine,
)


def _rule(table: torch.Tensor, length: int, layout_block: int, causal: bool) -> torch.Tensor:
    rows = torch.arange(length) // layout_block
    ok = table[rows[:, None], rows[None, :]].clone()
    return ok.tril() if causal else ok


def _layout(nb: int, density: float, seed: int, diagonal: bool | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(nb, nb, generator=gen) < density
    if diagonal is not None:
        table.fill_diagonal_(diagonal)
    return table


CASES = [
    # (length, layout block, kernel block): aligned, layout blocks smaller and larger than the
    # kernel's, a layout block that is no divisor or multiple of it, cut last blocks.
    (64, 16, 16),
    (100, 8, 16),
    (100, 32, 16),
    (97, 12, 8),
    (37, 4, 8),
    (130, 64, 16),
]


@pytest.mark.parametrize(("length", "layout_block", "block"), CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("density", "diagonal"), [(0.3, None), (0.6, False), (0.8, True)])
def test_classes_expand_to_the_rule(
    length: int, layout_block: int, block: int, causal: bool, density: float, diagonal: bool | None
) -> None:
    nb = -(-length // layout_block) + 2  # a table larger than the run: its corner is used
    table = _layout(nb, density, length + layout_block, diagonal)
    got = block_classes(table, length, layout_block, block, causal)
    rule = _rule(table, length, layout_block, causal)
    m = -(-length // block)
    assert got.classes.shape == (m, m) and got.classes.dtype == torch.int8
    padded = torch.zeros(m * block, m * block, dtype=torch.bool)
    padded[:length, :length] = rule
    inside = torch.zeros_like(padded)
    inside[:length, :length] = True
    for i in range(m):
        for j in range(m):
            cell = padded[i * block : (i + 1) * block, j * block : (j + 1) * block]
            within = inside[i * block : (i + 1) * block, j * block : (j + 1) * block]
            c = int(got.classes[i, j])
            if c == FULL:
                assert bool(cell[within].all()), (i, j)
            elif c == EMPTY:
                assert not bool(cell.any()), (i, j)
            else:
                assert c == PARTIAL and bool(cell.any()), (i, j)
                # Without the lookup flag, causality alone must explain a partial block.
                if not got.lookup:
                    rows = torch.arange(i * block, (i + 1) * block)[:, None]
                    cols = torch.arange(j * block, (j + 1) * block)[None, :]
                    explained = (cols <= rows) if causal else torch.ones_like(cell)
                    assert torch.equal(cell[within], explained[within]), (i, j)


@pytest.mark.parametrize(("length", "layout_block", "block"), CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_lists_compute_exactly_the_rule(
    length: int, layout_block: int, block: int, causal: bool, backward: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from dilated.kernels import flash4_block_sparse

    monkeypatch.setattr(flash4_block_sparse, "BLOCK", (block, block))
    table = _layout(-(-length // layout_block), 0.4, length, None)
    classes = block_classes(table, length, layout_block, block, causal)
    tables = flash4_path._run_tables_on(
        classes, table, length, layout_block, causal, torch.device("cpu")
    )
    lists = tables.backward if backward else tables.forward
    got = fa4_emulator.allowed_pairs(
        lists, tables.mask, tables.aux, 1, 1, length, length, backward=backward
    )
    assert torch.equal(got[0, 0], _rule(table, length, layout_block, causal))
    # The lists name exactly the non-empty blocks.
    listed = int(lists.mask_cnt.sum() + lists.full_cnt.sum())
    assert listed == int((classes.classes > 0).sum())
    assert int(lists.mask_cnt.sum()) == int((classes.classes == PARTIAL).sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_a_key_mask_refines_the_lists(causal: bool, backward: bool) -> None:
    length, layout_block, block = 100, 8, 16
    table = _layout(-(-length // layout_block), 0.6, 7, True)
    classes = block_classes(table, length, layout_block, block, causal)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(4, length, generator=gen) < 0.7
    keep[1] = True  # no padding: the lists stay those without a mask
    keep[2, :40] = False  # a run of padded key blocks: they drop out
    keep[3] = False  # every key padded: nothing to visit
    kept = kept_lists(classes.classes.t().contiguous() if backward else classes.classes)
    lists = refine(kept, key_states(keep[:, None], block), backward, (block, block))
    rows = -(-length // block) * block
    aux = torch.zeros(4, rows, dtype=torch.int32)
    aux[:, :length] = keep
    mask = ElementMask(causal, layout_block if classes.lookup else 0, KEEP_PER_BATCH)
    layout_aux = flash4_path._run_tables_on(
        classes, table, length, layout_block, causal, torch.device("cpu")
    ).aux
    got = fa4_emulator.allowed_pairs(
        lists, mask, [*layout_aux, aux], 4, 1, length, length, backward=backward
    )
    want = _rule(table, length, layout_block, causal)[None] & keep[:, None, :]
    assert torch.equal(got[:, 0], want)
    assert int(lists.mask_cnt[3].sum() + lists.full_cnt[3].sum()) == 0
    unpadded = lists_of(classes.classes, backward, torch.device("cpu"), (block, block))
    assert torch.equal(lists.mask_cnt[1], unpadded.mask_cnt[0])
    assert torch.equal(lists.full_cnt[1], unpadded.full_cnt[0])
    assert lists.mask_idx.shape[-1] <= -(-length // block)


def test_key_states() -> None:
    keep = torch.tensor([[[True, True, True, False, False, False, True]]])
    # Blocks of 3: all kept, all padded, and a last block of one row that is kept.
    assert key_states(keep, 3).tolist() == [[[2, 0, 2]]]
    assert key_states(keep, 2).tolist() == [[[2, 1, 0, 2]]]


def test_tables_are_built_once_per_geometry(monkeypatch: pytest.MonkeyPatch) -> None:
    from dilated.core import SparsePatternConfig
    from dilated.core.sparsity import resolve_layouts

    built: list[int] = []
    real = flash4_path.block_classes

    def counted(*args: object, **kwargs: object) -> object:
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(flash4_path, "block_classes", counted)
    cfg = SparsePatternConfig("local_window", local_window_size=16, block_size=8)
    layouts = resolve_layouts(cfg, [32, 64], [1, 2])
    q = torch.zeros(1, 128, 2, 8)
    first = flash4_path._prepared(layouts, 8, True, q, q, q, "key-a")
    count = len(built)
    assert count == len(first.plan.tables) > 0
    again = flash4_path._prepared(layouts, 8, True, q.clone(), q, q, "key-a")
    assert again is first and len(built) == count
    device = torch.device("cpu")
    tables = first.tables(device)
    assert first.tables(device) is tables
    assert first.pieces("out", device, 8, 4)[0] is first.pieces("out", device, 8, 4)[0]
    # Another layout key, shape or causality is another entry.
    assert flash4_path._prepared(layouts, 8, False, q, q, q, "key-a") is not first
    assert flash4_path._prepared(layouts, 8, True, q, q, q, "key-b") is not first
    assert flash4_path._prepared(layouts, 8, True, q[:, :96], q, q, "key-a") is not first
