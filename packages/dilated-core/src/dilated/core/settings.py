"""Process-wide settings: the switches between code paths that compute the same function.

Every switch of the ``dilated`` packages is a field of one frozen
[`Settings`][dilated.core.settings.Settings]. A setting never changes a result beyond
rounding, only how it is computed (which kernel, how many launches); they exist for tests (to
run a GPU kernel under ``TRITON_INTERPRET=1`` on the CPU) and for measurements (to time one path
against the other).

Where a setting comes from, last wins:

1. its default (the field's);
2. its environment variable, ``DILATED_`` and the field's name in capitals
   (``DILATED_FUSED_MERGE=0``), read once, at the first [`get_settings`][dilated.core.settings.get_settings]:
   ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (any case), and ``auto`` for
   the fields that take None; unset or empty keeps the default;
3. [`set_settings`][dilated.core.settings.set_settings] (for the rest of the process) or
   [`use_settings`][dilated.core.settings.use_settings] (for a ``with`` block).

```python
from dilated.core.settings import get_settings, use_settings

with use_settings(fused_merge=False):
    assert get_settings().fused_merge is False  # the plain-PyTorch merge, everywhere
```

The settings are one process-wide value, not a per-thread one: the backward pass runs on
autograd's device threads, which must see the settings of the code that called ``backward()``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dilated.core.checks import check_bool, check_optional_bool, parse_env_flag

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "alias_module_switches",
    "get_settings",
    "set_settings",
    "use_settings",
]

#: Prefix of the environment variables of the settings: field ``fused_merge`` is read from
#: ``DILATED_FUSED_MERGE``.
ENV_PREFIX = "DILATED_"

#: The fields that take None ("auto": the package decides per call).
_AUTO_FIELDS = ("fused_merge", "fused_accumulate", "sparse_rows_kernel", "sparse_flash4")


@dataclass(frozen=True)
class Settings:
    """The switches of the ``dilated`` packages (see the module's page for where each comes from).

    None means "auto": the package decides per call, from the device and dtype.

    Attributes:
        fused_merge: [`dilated.kernels.merge.merge_into`][dilated.kernels.merge.merge_into] runs
            its one-launch Triton kernel: None (default) for CUDA float32 accumulators when
            Triton is installed, True wherever it runs (the tests run it on the CPU under
            ``TRITON_INTERPRET=1``), False never (the plain-PyTorch formula).
            ``DILATED_FUSED_MERGE``.
        fused_accumulate: the same choice for the gradient adds of
            [`dilated.kernels.accumulate`][dilated.kernels.accumulate].
            ``DILATED_FUSED_ACCUMULATE``.
        sparse_rows_kernel: dilated-sparse computes a run's one-row tiles (a band's edge rows)
            with dilated-kernels' rows kernel, one launch per run, in the forward pass: None
            (default) where Triton runs on CUDA for the inputs, True wherever it runs, False
            never (one primitive call per tile). ``DILATED_SPARSE_ROWS_KERNEL``.
        sparse_head_slot: dilated-sparse lets an index dimension (segments, phases, stacked
            tiles) take the primitive's head slot, making fewer calls; False keeps every
            call's real heads there and loops over the other dimensions (default True).
            ``DILATED_SPARSE_HEAD_SLOT``.
        sparse_flash4: dilated-sparse's path (see [`dilated.sparse.paths`][dilated.sparse.paths]):
            None (default) flash-attn-4's block sparsity wherever it runs the call, else the
            tiles path; True flash-attn-4 always (a call it cannot run raises ``ValueError``
            saying why); False the tiles path always. ``DILATED_SPARSE_FLASH4``.
        small_calls_on_sdpa_flash: ``engine="auto"`` sends a small dense call (at most
            ``dilated.kernels.engines.SMALL_CALL_WORK``) that would go to flash-attn-4 to
            PyTorch's flash kernels when they take it, whose host cost per call is a fraction
            of flash-attn-4's (default True); False keeps the usual order at every size.
            ``DILATED_SMALL_CALLS_ON_SDPA_FLASH``.

    Raises:
        ArgumentTypeError: a field that is not a bool (or None where None is allowed).
    """

    fused_merge: bool | None = None
    fused_accumulate: bool | None = None
    sparse_rows_kernel: bool | None = None
    sparse_head_slot: bool = True
    sparse_flash4: bool | None = None
    small_calls_on_sdpa_flash: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _AUTO_FIELDS:
                check_optional_bool(f.name, value)
            else:
                check_bool(f.name, value)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The defaults, overridden by the environment variables that are set and not empty.

        Args:
            environ: the variables to read (default ``os.environ``).

        Raises:
            ValueError: a variable holding something other than the values above, named.
        """
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            variable = ENV_PREFIX + f.name.upper()
            raw = env.get(variable, "")
            if raw.strip():
                changes[f.name] = parse_env_flag(variable, raw, auto=f.name in _AUTO_FIELDS)
        return cls(**changes)


_lock = threading.Lock()
_current: Settings | None = None


def get_settings() -> Settings:
    """The settings in force (on the first call, the defaults and the environment variables).

    Raises:
        ValueError: an environment variable of a setting holds an unknown value, named.
    """
    current = _current
    if current is None:
        return _initial()
    return current


def _initial() -> Settings:
    global _current
    with _lock:
        if _current is None:
            _current = Settings.from_environ()
        return _current


def set_settings(settings: Settings | None = None, /, **changes: Any) -> Settings:
    """Put ``settings`` (default: the settings in force), with ``changes`` to its fields, in
    force for the whole process; return the settings it replaces (to restore them later).

    Raises:
        TypeError: a keyword that is not a field of [`Settings`][dilated.core.settings.Settings].
        ArgumentTypeError: a value of the wrong kind (the field is named).
    """
    global _current
    in_force = get_settings()
    base = in_force if settings is None else settings
    if not isinstance(base, Settings):
        raise TypeError(f"settings must be a Settings or None, got {type(base).__name__}")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        names = ", ".join(f.name for f in dataclasses.fields(Settings))
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are {names}")
    new = dataclasses.replace(base, **changes) if changes else base
    with _lock:
        previous = _current if _current is not None else in_force
        _current = new
    return previous


@contextmanager
def use_settings(settings: Settings | None = None, /, **changes: Any) -> Iterator[Settings]:
    """Put settings in force for a ``with`` block (as [`set_settings`][dilated.core.settings.set_settings])
    and restore the previous ones after it, however it ends; yields the settings in force.

    Process-wide, like ``set_settings``: other threads see them during the block too.
    """
    previous = set_settings(settings, **changes)
    try:
        yield get_settings()
    finally:
        set_settings(previous)


def _warn_alias(module: str, name: str, field: str) -> None:
    warnings.warn(
        f"{module}.{name} is the setting {field!r} of dilated.core.settings: use "
        f"use_settings({field}=...) / set_settings({field}=...) or the environment variable "
        f"{ENV_PREFIX}{field.upper()}",
        DeprecationWarning,
        stacklevel=3,
    )


def _alias(module: str, name: str, field: str) -> property:
    def read(_: types.ModuleType) -> Any:
        _warn_alias(module, name, field)
        return getattr(get_settings(), field)

    def write(_: types.ModuleType, value: Any) -> None:
        _warn_alias(module, name, field)
        set_settings(**{field: value})

    return property(read, write, doc=f"Deprecated: the setting {field!r}.")


def alias_module_switches(module_name: str, aliases: Mapping[str, str]) -> None:
    """Keep a module's former switch attributes working, deprecated, as spellings of settings.

    After ``alias_module_switches(__name__, {"FUSED": "fused_merge"})`` in a module, reading
    ``module.FUSED`` returns ``get_settings().fused_merge`` and assigning it calls
    ``set_settings(fused_merge=...)``, each with a ``DeprecationWarning`` (so that a script, or
    ``monkeypatch.setattr``, written against the attribute still steers the code instead of
    setting an attribute nothing reads).

    Args:
        module_name: the module (``__name__``), already in ``sys.modules``.
        aliases: old attribute name -> field of [`Settings`][dilated.core.settings.Settings].

    Raises:
        ValueError: an alias naming no field of ``Settings``, or an attribute the module
            still defines (it would hide the alias).
    """
    fields = {f.name for f in dataclasses.fields(Settings)}
    module = sys.modules[module_name]
    for name, field in aliases.items():
        if field not in fields:
            raise ValueError(f"alias {name!r} names no setting: {field!r} is not a field")
        if name in module.__dict__:
            raise ValueError(f"module {module_name!r} still defines {name!r}; remove it first")
    # Properties of the module's class: data descriptors, which an assignment cannot shadow.
    namespace = {n: _alias(module_name, n, f) for n, f in aliases.items()}
    base = type(module)
    module.__class__ = type(f"{base.__name__}WithSettingAliases", (base,), namespace)
