"""dilated.core.settings: one frozen value of every switch, from defaults, environment and code."""

from __future__ import annotations

import dataclasses
import sys
import threading
import types

import pytest

from dilated.core import settings as settings_module
from dilated.core.checks import ArgumentTypeError, parse_env_flag
from dilated.core.settings import (
    Settings,
    alias_module_switches,
    get_settings,
    set_settings,
    use_settings,
)


def test_defaults_and_field_rules() -> None:
    s = Settings()
    assert (s.fused_merge, s.fused_accumulate, s.sparse_rows_kernel, s.sparse_head_slot) == (
        None, None, None, True,
    )  # fmt: skip
    assert s.sparse_flash4 is None and s.small_calls_on_sdpa_flash is True
    with pytest.raises(ArgumentTypeError, match=r"fused_merge must be a bool.*strings are not"):
        Settings(fused_merge="yes")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="sparse_head_slot must be a bool"):
        Settings(sparse_head_slot=None)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fused_merge = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "auto", "expected"),
    [("1", False, True), (" Yes ", False, True), ("ON", True, True), ("0", False, False),
     ("off", True, False), ("", False, None), ("  ", True, None), ("auto", True, None)],
)  # fmt: skip
def test_parse_env_flag(raw: str, auto: bool, expected: bool | None) -> None:
    assert parse_env_flag("X", raw, auto=auto) is expected


@pytest.mark.parametrize(("raw", "auto"), [("maybe", True), ("auto", False), ("2", False)])
def test_parse_env_flag_names_the_variable_and_the_choices(raw: str, auto: bool) -> None:
    with pytest.raises(ValueError, match=f"environment variable X={raw!r} must be one of 1, ") as e:
        parse_env_flag("X", raw, auto=auto)
    assert ("or auto" in str(e.value)) is auto


def test_from_environ_reads_one_variable_per_field() -> None:
    env = {
        "DILATED_FUSED_MERGE": "0",
        "DILATED_FUSED_ACCUMULATE": "",  # empty: the default
        "DILATED_SPARSE_ROWS_KERNEL": "auto",
        "DILATED_SPARSE_HEAD_SLOT": " off ",
        "DILATED_SMALL_CALLS_ON_SDPA_FLASH": "no",
        "DILATED_SOMETHING_ELSE": "1",  # not a setting: ignored
    }
    assert Settings.from_environ(env) == Settings(
        fused_merge=False, fused_accumulate=None, sparse_rows_kernel=None, sparse_head_slot=False,
        small_calls_on_sdpa_flash=False,
    )  # fmt: skip
    assert Settings.from_environ({"DILATED_FUSED_ACCUMULATE": "true"}).fused_accumulate is True
    with pytest.raises(ValueError, match="DILATED_SPARSE_HEAD_SLOT='auto'"):
        Settings.from_environ({"DILATED_SPARSE_HEAD_SLOT": "auto"})  # this one takes no None
    with pytest.raises(ValueError, match="DILATED_FUSED_MERGE='fast'"):
        Settings.from_environ({"DILATED_FUSED_MERGE": "fast"})


def test_the_environment_is_read_once_at_the_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "_current", None)  # as in a fresh process
    monkeypatch.setenv("DILATED_FUSED_MERGE", "1")
    monkeypatch.setenv("DILATED_SPARSE_HEAD_SLOT", "no")
    first = get_settings()
    assert first.fused_merge is True and first.sparse_head_slot is False
    monkeypatch.setenv("DILATED_FUSED_MERGE", "0")
    assert get_settings() is first  # a later change of the environment is not read


def test_a_bad_variable_fails_at_the_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "_current", None)
    monkeypatch.setenv("DILATED_SPARSE_ROWS_KERNEL", "sometimes")
    with pytest.raises(ValueError, match="DILATED_SPARSE_ROWS_KERNEL='sometimes'"):
        get_settings()


def test_set_settings_replaces_and_returns_the_previous() -> None:
    before = get_settings()
    try:
        previous = set_settings(fused_merge=True, sparse_head_slot=False)
        assert previous is before
        now = get_settings()
        assert (now.fused_merge, now.sparse_head_slot) == (True, False)
        assert now.fused_accumulate == before.fused_accumulate  # untouched fields kept
        assert set_settings(Settings()) is now
        assert get_settings() == Settings()
    finally:
        set_settings(before)
    assert get_settings() is before
    with pytest.raises(TypeError, match=r"unknown setting.*fused; the settings are fused_merge"):
        set_settings(fused=True)
    with pytest.raises(TypeError, match="settings must be a Settings or None, got dict"):
        set_settings({})  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="fused_accumulate must be a bool"):
        set_settings(fused_accumulate=1)
    assert get_settings() is before  # a refused change changes nothing


def test_use_settings_restores_however_the_block_ends() -> None:
    before = get_settings()
    with use_settings(fused_merge=False) as inside:
        assert inside is get_settings() and inside.fused_merge is False
        with use_settings(fused_merge=True, sparse_rows_kernel=False):
            assert get_settings().fused_merge is True
        assert get_settings() is inside
    assert get_settings() is before
    with pytest.raises(RuntimeError, match="boom"), use_settings(sparse_head_slot=False):
        raise RuntimeError("boom")
    assert get_settings() is before


def test_settings_are_one_value_for_every_thread() -> None:
    """The backward pass runs on autograd's device threads: they see the caller's settings."""
    seen: list[Settings] = []
    with use_settings(fused_accumulate=True) as inside:
        worker = threading.Thread(target=lambda: seen.append(get_settings()))
        worker.start()
        worker.join()
    assert seen == [inside]


def test_alias_module_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("dilated_test_alias")
    module.KEEP = 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    alias_module_switches(module.__name__, {"SLOT": "sparse_head_slot"})
    with use_settings(sparse_head_slot=False):
        with pytest.warns(DeprecationWarning, match=r"dilated_test_alias\.SLOT is the setting"):
            assert module.SLOT is False  # type: ignore[attr-defined]
        with pytest.warns(DeprecationWarning, match="use_settings"):
            module.SLOT = True  # type: ignore[attr-defined]
        assert get_settings().sparse_head_slot is True
        module.OTHER = 2  # type: ignore[attr-defined]  # other attributes are plain
        assert module.KEEP == 1 and module.OTHER == 2  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="names no setting: 'fused' is not a field"):
        alias_module_switches(module.__name__, {"X": "fused"})
    with pytest.raises(ValueError, match="still defines 'KEEP'"):
        alias_module_switches(module.__name__, {"KEEP": "fused_merge"})
