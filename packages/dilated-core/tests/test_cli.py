"""The `dilated` command, run in-process on tiny sizes."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from dilated.core import DilatedAttention, Implementation, MultiheadDilatedAttention
from dilated.core import registry as reg
from dilated.core.cli import main
from dilated.core.cli.measure import peak_bytes

TINY = [
    "--device",
    "cpu",
    "--seq-lens",
    "64,96",
    "--heads",
    "2",
    "--head-dim",
    "8",
    "--segment-lengths",
    "16,32",
    "--dilation-rates",
    "1,2",
    "--repeats",
    "3",
    "--warmup",
    "0",
    "--min-time",
    "0.02",
]


def test_info_lists_the_standard_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    auto = out.split("kind='auto' picks '")[1].split("'")[0]
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.strip()}
    assert rows["dilated-core"] == [version("dilated-core")]
    assert rows["standard"][:3] == ["dilated-core", "0", "cpu/cuda"]
    assert f"torch {torch.__version__}" in out
    assert auto in rows  # the kind auto picks is one of the listed implementations


def _report(out: str, prefix: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(prefix))


def test_check_names_what_it_checked_and_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    checked, skipped = _report(out, "checked: "), _report(out, "skipped: ")
    impls = reg.available_implementations()
    for name, impl in impls.items():
        if impl.supports("cpu"):
            assert name in checked  # distributed kinds too, as a world of one
            assert any(ln.startswith(f"{name} ") for ln in out.splitlines())
        else:
            assert f"{name} (runs on {'/'.join(impl.devices)} only, not cpu)" in skipped
    for kind in set(reg.KNOWN_KINDS) - set(impls):
        assert f"{kind} (" in skipped
    assert "match the reference" in out.splitlines()[-1]
    assert "standard" in out.splitlines()[-1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"dilated-core {version('dilated-core')}")


class _Wrong(DilatedAttention):
    """Drops the last branch: a plausible bug that `dilated check` must catch."""

    def _attention(self, q, k, v, *, is_causal, key_padding_mask, dropout_p):  # type: ignore[no-untyped-def]
        from dilated.core import dilated_attention

        c = self.config
        ws, rs = c.segment_lengths, c.dilation_rates
        return dilated_attention(
            q,
            k,
            v,
            ws[:-1] or ws,
            rs[:-1] or rs,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
        )


@pytest.fixture
def wrong_kind() -> Iterator[None]:
    reg.available_implementations()
    reg.register_implementation(Implementation("wrong", _Wrong, MultiheadDilatedAttention, "tests"))
    yield
    reg._registered.pop("wrong")


def test_check_fails_on_a_wrong_implementation(
    wrong_kind: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "MISMATCH" in out


def test_bench_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *TINY, "--backward", "--causal"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("dense", "standard"))]
    assert len(lines) == 4
    for ln in lines:
        # "<impl> <seq> <median> (<q1>-<q3>) <tokens/s> <peak> <err>": a median inside its spread.
        median = float(ln.split()[2])
        q1, q3 = (float(x) for x in ln.split()[3].strip("()").split("-"))
        assert 0 < q1 <= median <= q3
        if ln.startswith("standard"):
            assert float(ln.split()[-1]) < 1e-4  # max err against the float64 reference
            assert ln.split()[-2] == "-"  # no CPU peak memory: it is not measured, not made up
    assert "not measured on CPU" in out


class _Raises(DilatedAttention):
    """An implementation that fails at run time: bench must report it and go on."""

    def _attention(self, q, k, v, *, is_causal, key_padding_mask, dropout_p):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel exploded")


@pytest.fixture
def raising_kind() -> Iterator[None]:
    reg.available_implementations()
    reg.register_implementation(
        Implementation("raises", _Raises, MultiheadDilatedAttention, "tests")
    )
    yield
    reg._registered.pop("raises")


def test_bench_reports_a_failing_cell_and_goes_on(
    raising_kind: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *TINY]) == 1
    out = capsys.readouterr().out
    assert out.count("error: RuntimeError: kernel exploded") == 2
    assert len([ln for ln in out.splitlines() if ln.startswith("standard")]) == 2


def test_bench_skips_dense_beyond_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *TINY, "--max-dense-seq", "64"]) == 0
    dense = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("dense")]
    assert [row[:3] for row in dense][1] == ["dense", "96", "skipped:"]
    assert "above --max-dense-seq 64" in " ".join(dense[1])
    assert dense[0][2] != "skipped:"


def test_kinds_filter_runs_only_those_and_names_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--device", "cpu", "--kinds", "standard"]) == 0
    out = capsys.readouterr().out
    assert "ran: standard" in out or "checked: standard" in out
    assert "(not in --kinds)" in out
    with pytest.raises(SystemExit) as exc:
        main(["bench", *TINY, "--kinds", "standard,nope"])
    assert exc.value.code == 2
    assert "unknown kind(s) nope; valid:" in capsys.readouterr().err


def test_peak_memory_is_measured_on_cuda_only() -> None:
    assert peak_bytes(lambda: torch.randn(64, 64) * 2, torch.device("cpu")) is None


def test_bench_plot_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(["bench", *TINY, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {path}" in capsys.readouterr().out


def test_bench_plot_without_suffix_names_the_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["bench", *TINY, "--plot", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out").exists()
    assert f"plot written to {tmp_path / 'out.png'}" in capsys.readouterr().out


def test_bench_plot_legend_covers_no_point() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dilated.core.cli.bench import _figure

    times = {
        name: [(1024, 1.0 + i), (2048, 3.0 + i), (4096, 9.0 + i)] for i, name in enumerate("abcd")
    }
    fig = _figure(times, "cpu, float32")
    try:
        fig.canvas.draw()
        (ax,) = fig.axes
        legend = ax.get_legend().get_window_extent()
        # Outside the axes altogether, so it covers no point whatever the data.
        assert not legend.overlaps(ax.get_window_extent())
        assert legend.x0 >= ax.get_window_extent().x1
    finally:
        plt.close(fig)


def test_bench_names_what_it_ran_and_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *TINY]) == 0
    out = capsys.readouterr().out
    ran = _report(out, "ran: ")
    for name, impl in reg.available_implementations().items():
        assert (name in ran) == impl.supports("cpu")
    if set(reg.KNOWN_KINDS) - set(reg.available_implementations()):
        assert _report(out, "skipped: ")


def _fail_before_work(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    from dilated.core.cli import bench

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started before the options were checked")

    monkeypatch.setattr(bench, "make_inputs", no_work)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--device", "meta"], "--device 'meta': only cpu and cuda"),
        (["--plot", "/nonexistent-dir/b.png"], "the folder '/nonexistent-dir' does not exist"),
        (["--plot", "bench.txt"], "matplotlib cannot write '.txt' files"),
    ],
)
def test_bench_bad_device_or_plot_fails_first(
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "--plot" in extra:
        pytest.importorskip("matplotlib")
    argv = ["bench", *TINY, *extra] if "--device" not in extra else ["bench", *extra]
    assert message in _fail_before_work(argv, monkeypatch, capsys)


def test_bench_plot_into_an_unwritable_folder_fails_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from dilated.core.cli import options

    monkeypatch.setattr(options.os, "access", lambda path, mode: False)  # root ignores modes
    err = _fail_before_work(
        ["bench", *TINY, "--plot", str(tmp_path / "b.png")], monkeypatch, capsys
    )
    assert "is not writable" in err


def test_bench_plot_without_matplotlib_fails_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _fail_before_work(["bench", *TINY, "--plot", "b.png"], monkeypatch, capsys)
    assert "--plot needs matplotlib: pip install 'dilated-core[plot]'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--seq-lens", "0"], "--seq-lens: expected positive integers"),
        (
            ["bench", "--device", "cpu", "--segment-lengths", "8,16", "--dilation-rates", "1"],
            "same length",
        ),
        (
            ["bench", "--device", "cpu", "--segment-lengths", "6", "--dilation-rates", "4"],
            "multiple of",
        ),
        (["bench", "--heads", "two"], "--heads: expected a positive integer"),
        (["bench", "--warmup", "-1"], "--warmup: expected an integer >= 0"),
        (["bench", "--dtype", "int8"], "--dtype: invalid choice"),
        (["bench", "--segment-lengths", "8,x"], "--segment-lengths: expected comma-separated"),
    ],
)
def test_bad_arguments_name_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_check_with_nothing_registered_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dilated.core.cli import selection

    monkeypatch.setattr(selection, "available_implementations", dict)
    assert main(["check", "--device", "cpu"]) == 1
    assert "no dilated-attention implementation is registered" in capsys.readouterr().out
