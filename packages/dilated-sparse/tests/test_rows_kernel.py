"""The forward pass with one-row tiles computed by the rows kernel of dilated-kernels (its
Triton kernel under ``TRITON_INTERPRET=1`` here), against the dense float64 judge.

The backward pass is the primitive's, so these tests check that the rows kernel's output and
LSE are right wherever a layout has edge rows: every layout, causal, grouped-query attention
(strided and gathered key/value heads: the latter take the primitive), key padding, short last
segments, and accumulators that the rows kernel writes first or merges into.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_functional as functional_tests
import torch
from test_functional import LAYOUTS, RATES, SEGMENTS, SHAPES, _check

from dilated.core import SparsePatternConfig
from dilated.core.settings import use_settings
from dilated.kernels._capabilities import HAS_TRITON
from dilated.kernels.backends.triton import interpreting
from dilated.sparse import engine

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()), reason="needs triton with TRITON_INTERPRET=1"
)


@pytest.fixture
def rows_launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Force the rows kernel and count its launches (entries per launch)."""
    launches: list[int] = []
    kernel = engine.rows_forward_into

    def counted(*args: object, **kwargs: object) -> None:
        launches.append(len(args[7].entries))  # type: ignore[attr-defined]
        kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "rows_forward_into", counted)
    with use_settings(sparse_rows_kernel=True):
        yield launches


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("seq", "heads", "kv_heads", "padding"), SHAPES)
def test_every_layout_matches_the_judge(
    rows_launches: list[int],
    name: str,
    is_causal: bool,
    seq: int,
    heads: int,
    kv_heads: int,
    padding: bool,
) -> None:
    _check(
        LAYOUTS[name], batch=2, seq=seq, heads=heads, head_dim=8, segment_lengths=SEGMENTS,
        dilation_rates=RATES, kv_heads=kv_heads, is_causal=is_causal, padding=padding, seed=seq,
    )  # fmt: skip
    if name == "local_window" and not is_causal:
        assert rows_launches, "a band's edge rows should take the rows kernel"


def test_long_segments_split_rows_into_entries(rows_launches: list[int]) -> None:
    # Blocks longer than an entry (16 rows under the interpreter), a multi-run row (global
    # columns next to the band) and float16.
    cfg = SparsePatternConfig("global_local", local_window_size=40, global_tokens=20, block_size=20)
    for dtype in (torch.float32, torch.float16):
        _check(
            cfg, batch=1, seq=250, heads=4, head_dim=16, segment_lengths=[120, 240],
            dilation_rates=[1, 2], kv_heads=2, padding=True, dtype=dtype,
        )  # fmt: skip
    assert max(rows_launches) > 1


def test_bfloat16_keeps_the_primitive(rows_launches: list[int]) -> None:
    # The interpreter's bfloat16 tl.dot is wrong: such calls must not take the kernel there.
    _check(
        LAYOUTS["local_window"], batch=1, seq=48, heads=2, head_dim=16,
        segment_lengths=[16, 48], dilation_rates=[1, 3], dtype=torch.bfloat16,
    )  # fmt: skip
    assert not rows_launches


def test_random_layouts_and_configurations(rows_launches: list[int]) -> None:
    # The hypothesis search of test_functional, with the rows kernel forced.
    functional_tests.test_random_layouts_and_configurations()
    assert rows_launches


def test_plan_counts_one_launch_per_run() -> None:
    from dilated.core.sparsity import resolve_layouts

    cfg = LAYOUTS["local_window"]
    layouts = resolve_layouts(cfg, SEGMENTS, RATES)
    shape = (1, 48, 4, 16)
    calls = engine.count_calls(layouts, cfg.block_size, shape, 4, False)
    launches = engine.count_calls(layouts, cfg.block_size, shape, 4, False, rows_kernel=True)
    assert launches < calls
