"""examples/train_lm.py writes its loss curve into an ignored run folder unless told otherwise
(it used to overwrite the tracked docs figure)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def example(script: Callable[[str, str], ModuleType]) -> ModuleType:
    return script("examples/train_lm.py", "train_lm")


def test_default_plot_is_a_fresh_run_folder(example: ModuleType) -> None:
    path = example.default_plot_path(0.0)
    assert path == Path("runs/19700101-000000/train_loss.png")


def test_default_plot_folder_is_ignored_and_untracked(example: ModuleType) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    path = example.default_plot_path()
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", str(path)], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, f"{path} is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "--", "runs"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert not tracked.stdout


def test_missing_plot_folder_fails_before_training(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = example
    monkeypatch.setattr("sys.argv", ["train_lm.py", "--plot", "/nonexistent-dir/loss.png"])
    with pytest.raises(SystemExit) as raised:
        module.main()
    assert raised.value.code == 2
    assert "does not exist" in capsys.readouterr().err
