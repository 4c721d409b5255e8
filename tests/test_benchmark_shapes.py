"""``benchmarks/shapes.py`` compares a call whose segments are longer than the sequence with the
same call cut to the sequence: the cut must be the same math (checked here against the dense
judge), or the row would time another computation."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from dilated.core.presets import PRESETS
from dilated.core.testing import dense_dilated_attention, make_inputs


@pytest.fixture(scope="module")
def bench(script: Callable[[str, str], ModuleType]) -> ModuleType:
    return script("benchmarks/shapes.py", "shapes_benchmark")


@pytest.mark.parametrize("seq", [40, 37, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_cut_branches_are_the_same_math(bench: ModuleType, seq: int, causal: bool) -> None:
    ws, rs = (8, 32, 128, 512), (1, 2, 8, 16)
    cut = bench.cut(ws, rs, seq)
    assert all(w % r == 0 for w, r in zip(cut, rs))
    assert cut != ws
    x = make_inputs(1, seq, 16, 8, dtype=torch.float64, seed=seq)
    want = dense_dilated_attention(x.q, x.k, x.v, ws, rs, is_causal=causal)
    got = dense_dilated_attention(x.q, x.k, x.v, cut, rs, is_causal=causal)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_the_longer_rows_default_preset_has_segments_longer_than_8k(bench: ModuleType) -> None:
    preset = PRESETS["longnet_1m"]
    assert bench.cut(preset.segment_lengths, preset.dilation_rates, 8192) != tuple(
        preset.segment_lengths
    )


def test_without_cuda_it_says_so(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would run")
    bench.main(["--rows", "short"])
    assert "no CUDA device" in capsys.readouterr().out
