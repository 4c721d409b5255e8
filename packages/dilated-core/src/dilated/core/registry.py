"""Registry of dilated-attention implementations and the factory functions built on it.

Packages announce implementations through the entry-point group ``dilated.attention``; each entry
point names an [`Implementation`][dilated.core.registry.Implementation]. ``create_dilated_attention(kind)`` and
``create_multihead_dilated_attention(kind)`` build modules by name, by preset, or with
``kind="auto"``, the highest-priority implementation that runs on the target device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import torch

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.checks import ArgumentTypeError, check_bool, check_instance
from dilated.core.presets import PRESETS, Preset

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_KINDS",
    "Implementation",
    "available_implementations",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "get_implementation",
    "register_implementation",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dilated.attention"

#: Kinds published by the ``dilated`` packages, and the distribution that provides each.
KNOWN_KINDS: dict[str, str] = {
    "standard": "dilated-core",
    "improved": "dilated-kernels",
    "ring": "dilated-ring",
    "distributed": "dilated-ring",
    "ring_distributed": "dilated-ring",
    "block_sparse": "dilated-sparse",
    "block_sparse_ring": "dilated-sparse",
}


@dataclass(frozen=True)
class Implementation:
    """One named dilated-attention implementation.

    Every field is checked when it is built, so that a bad one fails here, naming the field,
    and not in every later ``kind="auto"`` call.

    Attributes:
        name: the ``kind`` users ask for: a non-empty string, neither ``"auto"`` nor a preset
            name (those are resolved first, so the implementation could never be reached).
        attention: module class over ``(batch, seq, heads, head_dim)``, a subclass of
            [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention].
        multihead: module class over ``(batch, seq, embed_dim)``, a subclass of
            [`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention].
        package: distribution that ships it (named in errors and ``dilated info``).
        description: one line for ``dilated info``.
        priority: an int; ``kind="auto"`` takes the highest priority that supports the device.
        devices: device types it runs on (a list or tuple of strings, stored as a tuple).
        distributed: works on shards of a process group; never chosen by ``"auto"``;
            ``dilated bench``/``check`` run it as a world of one.
        backends: optional callable listing the backends usable here, for ``dilated info``.

    Raises:
        ValueError / ArgumentTypeError: a field that breaks its rule, named.
    """

    name: str
    attention: type[BaseDilatedAttention]
    multihead: type[BaseMultiheadDilatedAttention]
    package: str
    description: str = ""
    priority: int = 0
    devices: tuple[str, ...] = ("cpu", "cuda")
    distributed: bool = False
    backends: Callable[[], list[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ArgumentTypeError(
                f"name must be a non-empty str, the kind users ask for, got {self.name!r}"
            )
        if self.name == "auto" or self.name in PRESETS:
            raise ValueError(
                f"name {self.name!r} is reserved: kind={self.name!r} resolves to "
                f"{'the best implementation' if self.name == 'auto' else 'a preset'} before any "
                "implementation, so this one could never be reached"
            )
        for field_name, base in (
            ("attention", BaseDilatedAttention),
            ("multihead", BaseMultiheadDilatedAttention),
        ):
            cls = getattr(self, field_name)
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ArgumentTypeError(
                    f"{field_name} must be a subclass of {base.__name__}, got {cls!r}"
                )
        check_instance("package", self.package, str, "a distribution name (a str)")
        check_instance("description", self.description, str, "a str")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            # Compared with the others' at every kind="auto": a str would fail there, every time.
            raise ArgumentTypeError(
                "priority must be an int (kind='auto' takes the highest), got "
                f"{type(self.priority).__name__} {self.priority!r}"
            )
        devices = self.devices
        if isinstance(devices, str) or not isinstance(devices, (list, tuple)):
            raise ArgumentTypeError(
                f"devices must be a tuple of device types such as ('cpu', 'cuda'), got {devices!r}"
            )
        for i, dev in enumerate(devices):
            check_instance(f"devices[{i}]", dev, str, "a device type such as 'cuda'")
        # Frozen: a list would make the implementation unhashable.
        object.__setattr__(self, "devices", tuple(devices))
        check_bool("distributed", self.distributed)
        if self.backends is not None and not callable(self.backends):
            raise ArgumentTypeError(f"backends must be a callable or None, got {self.backends!r}")

    def supports(self, device: torch.device | str) -> bool:
        """Whether this implementation runs on ``device``."""
        return torch.device(device).type in self.devices


_lock = threading.Lock()
_registered: dict[str, Implementation] = {}
_loaded = False


def _check_kind(kind: Any) -> str:
    """Return ``kind`` if it is a string; anything else (a list of names, None) raises
    ``ArgumentTypeError`` (it would otherwise fail as an unhashable dict key)."""
    what = "one name, a str (an implementation, a preset or 'auto')"
    check_instance("kind", kind, str, what)
    return str(kind)


def register_implementation(impl: Implementation, *, replace: bool = False) -> None:
    """Add ``impl`` to the registry (what the entry points do at discovery).

    Raises:
        ArgumentTypeError: ``impl`` is not an ``Implementation`` (whose fields were checked
            when it was built).
        ValueError: another implementation already has its name (unless ``replace``).
    """
    check_instance("impl", impl, Implementation, "an Implementation")
    check_bool("replace", replace)
    with _lock:
        if impl.name in _registered and not replace and _registered[impl.name] != impl:
            raise ValueError(f"an implementation named {impl.name!r} is already registered")
        _registered[impl.name] = impl


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            impl = ep.load()
        except Exception as exc:  # a broken plugin must not hide the others
            logger.warning("could not load dilated.attention entry point %r: %s", ep.name, exc)
            continue
        if not isinstance(impl, Implementation):
            logger.warning("entry point %r does not name an Implementation; ignored", ep.name)
            continue
        with _lock:
            _registered.setdefault(impl.name, impl)
    _loaded = True


def available_implementations() -> dict[str, Implementation]:
    """Every registered implementation by name, entry points included."""
    _load_entry_points()
    with _lock:
        return dict(sorted(_registered.items()))


def _default_device(device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_implementation(
    kind: str = "auto", device: torch.device | str | None = None
) -> Implementation:
    """Resolve ``kind`` to an [`Implementation`][dilated.core.registry.Implementation].

    ``"auto"`` picks the highest-priority non-distributed implementation supporting ``device``
    (default: CUDA when available, else CPU). An unknown or uninstalled kind raises ``ValueError``
    naming the package to install.
    """
    _check_kind(kind)
    impls = available_implementations()
    if kind == "auto":
        dev = _default_device(device)
        if dev.type == "meta":
            # Shapes only (a model built on the meta device): choose as for the CPU.
            dev = torch.device("cpu")
        candidates = [i for i in impls.values() if not i.distributed and i.supports(dev)]
        if not candidates:
            raise ValueError(f"no installed dilated-attention implementation supports {dev}")
        best = max(candidates, key=lambda i: (i.priority, i.name))
        logger.debug("kind='auto' on %s chose %r (%s)", dev, best.name, best.package)
        return best
    if kind in impls:
        return impls[kind]
    if kind in KNOWN_KINDS:
        pkg = KNOWN_KINDS[kind]
        try:
            installed = version(pkg)
        except PackageNotFoundError:
            raise ValueError(
                f"kind={kind!r} is provided by the package {pkg!r}, which is not installed: "
                f"pip install {pkg}"
            ) from None
        raise ValueError(
            f"kind={kind!r} belongs to {pkg!r}, but the installed version {installed} does not "
            f"register it yet: pip install --upgrade {pkg}"
        )
    names = sorted(set(impls) | set(KNOWN_KINDS) | set(PRESETS) | {"auto"})
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(names)}")


def _resolve(kind: str, kwargs: dict[str, Any], multihead: bool) -> Implementation:
    """Apply a preset named by ``kind`` (filling only what the caller left out) and resolve it."""
    preset: Preset | None = PRESETS.get(_check_kind(kind))
    if preset is not None:
        kwargs.setdefault("segment_lengths", list(preset.segment_lengths))
        kwargs.setdefault("dilation_rates", list(preset.dilation_rates))
        if multihead:
            kwargs.setdefault("embed_dim", preset.embed_dim)
            kwargs.setdefault("num_heads", preset.num_heads)
        kind = "auto"
    for name in ("segment_lengths", "dilation_rates"):
        if kwargs.get(name) is None:
            raise ValueError(f"{name} is required (or name a preset: {', '.join(sorted(PRESETS))})")
    return get_implementation(kind, kwargs.get("device"))


def create_dilated_attention(kind: str = "auto", **kwargs: Any) -> BaseDilatedAttention:
    """Build a dilated-attention module over ``(batch, seq, heads, head_dim)``.

    Args:
        kind: an implementation name (``"standard"``, ``"improved"``, ``"ring"``, ...), a preset
            name (``"longnet_1m"``, ...) or ``"auto"``.
        **kwargs: ``segment_lengths``, ``dilation_rates`` and the implementation's own keywords
            (``softmax_scale``, ``attention_dropout``, ...). ``device`` only steers ``"auto"``.

    Returns:
        The module (no parameters, so it has no device of its own).
    """
    kw = dict(kwargs)
    impl = _resolve(kind, kw, multihead=False)
    kw.pop("device", None)
    return impl.attention(**kw)


def create_multihead_dilated_attention(
    kind: str = "auto", **kwargs: Any
) -> BaseMultiheadDilatedAttention:
    """Build a multi-head dilated-attention module over ``(batch, seq, embed_dim)``.

    Args:
        kind: an implementation name, a preset name, or ``"auto"``.
        **kwargs: ``embed_dim``, ``num_heads``, ``segment_lengths``, ``dilation_rates``, the
            module's other keywords (``dropout``, ``bias``, ``num_kv_heads``, ``device``, ...)
            and the settings of its attention class
            ([`attention_settings`][dilated.core.base.attention_settings]: ``group=`` for
            ``"ring"``, ``backend=`` for ``"improved"``, ...).

    Returns:
        The module, with its ``(out, None)``-returning forward.
    """
    kw = dict(kwargs)
    impl = _resolve(kind, kw, multihead=True)
    for name in ("embed_dim", "num_heads"):
        if kw.get(name) is None:
            raise ValueError(f"{name} is required for a multi-head module")
    return impl.multihead(**kw)
