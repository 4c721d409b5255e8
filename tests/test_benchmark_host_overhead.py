"""``benchmarks/host_overhead.py`` times dilated's own layers with the device work stubbed out:
it must print its table on a CPU and leave the real engines in place afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import pytest

import dilated.kernels.strided_run as strided_run


def test_prints_the_table_and_restores_the_engines(
    script: Callable[[str, str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    bench = script("benchmarks/host_overhead.py", "host_overhead_benchmark")
    interpret = os.environ.get("TRITON_INTERPRET")
    originals = (strided_run.subproblem_attention, strided_run.upload, strided_run.merge_pieces)
    bench.main(["--seqs", "48", "--segments", "16", "32", "--rates", "1", "2", "--heads", "4",
                "--head-dim", "16", "--calls", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| tokens | fwd us | fwd+bwd us |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 48 |"))
    fwd, both = (float(x) for x in row.strip("| ").split(" | ")[1:])
    assert fwd > 0 and both > 0
    assert (strided_run.subproblem_attention, strided_run.upload, strided_run.merge_pieces) == (
        originals
    )
    assert os.environ.get("TRITON_INTERPRET") == interpret
