"""``benchmarks/decode.py --quick`` runs every part on the CPU (tiny sizes, seconds): the script
a GPU session runs does not fail on its first line there. It checks that rows come out, never
how fast (benchmarks are scripts with a table, not timed tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode.py"


def test_quick_run_gives_every_row(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--profile-eager", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fast |" in done.stdout  # the tables are printed
    assert "eager decoding, 6 steps:" in done.stdout and "Self CPU" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("error") for r in rows] == [None] * len(rows)
    lm = [r for r in rows if r["part"] == "lm"]
    assert [r["mode"] for r in lm] == ["eager", "fast"]
    generate = {(r["impl"], r["cache"]) for r in rows if r["part"] == "hf-generate"}
    assert generate == {(i, c) for i in ("dilated", "sdpa") for c in ("dynamic", "static")}
    train = {(r["impl"], r["seq"]) for r in rows if r["part"] == "hf-train"}
    assert train == {(i, s) for i in ("dilated", "sdpa") for s in (48, 96)}
    for r in rows:
        times = [r[k] for k in ("prefill_ms", "ms") if k in r]
        assert times and all(math.isfinite(t) and t > 0 for t in times), r
