"""Which implementations ``dilated check`` and ``dilated bench`` run on a device, and why not
the others: every known or registered kind is either run or named with the reason it is not."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.distributed as dist

from dilated.core.registry import KNOWN_KINDS, Implementation, available_implementations

__all__ = ["Selection", "select_implementations"]


@dataclass(frozen=True)
class Selection:
    """The outcome of [`select_implementations`][dilated.core.cli.selection.select_implementations].

    Attributes:
        run: the implementations to run, by name order.
        how: for a name of ``run``, how it runs when that is not the plain way (a world of one).
        skipped: ``(kind, reason)`` for every kind that does not run.
    """

    run: list[Implementation]
    how: dict[str, str]
    skipped: list[tuple[str, str]]

    def lines(self, verb: str) -> list[str]:
        """``"<verb>: a, b (world of one)"`` and ``"skipped: c (why)"``, for the report."""
        ran = ", ".join(
            f"{i.name} ({self.how[i.name]})" if i.name in self.how else i.name for i in self.run
        )
        out = [f"{verb}: {ran or 'nothing'}"]
        if self.skipped:
            out.append("skipped: " + "; ".join(f"{kind} ({why})" for kind, why in self.skipped))
        return out


def _not_registered(kind: str, package: str) -> str:
    try:
        installed = version(package)
    except PackageNotFoundError:
        return f"{package} is not installed"
    return f"{package} {installed} is installed but registers no implementation of it yet"


def select_implementations(device: torch.device, kinds: Sequence[str] | None = None) -> Selection:
    """Split every known or registered kind into what runs on ``device`` and what cannot.

    ``kinds``: only these (``--kinds``); the others are listed as skipped, not asked for. A name
    that is neither known nor registered raises ``ValueError`` listing the valid ones.

    A distributed implementation runs as a world of one when no process group is initialised
    (each of them takes a missing group as a single rank): it computes the same result as a
    single-process call, so it is checked and timed, without any communication.
    """
    impls = available_implementations()
    valid = sorted({*impls, *KNOWN_KINDS})
    unknown = [k for k in kinds or () if k not in valid]
    if unknown:
        raise ValueError(
            f"--kinds: unknown kind(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    run: list[Implementation] = []
    how: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    grouped = dist.is_available() and dist.is_initialized()
    for name, impl in impls.items():
        if kinds is not None and name not in kinds:
            skipped.append((name, "not in --kinds"))
        elif not impl.supports(device):
            skipped.append((name, f"runs on {'/'.join(impl.devices)} only, not {device.type}"))
        elif impl.distributed and grouped:
            skipped.append(
                (name, "a process group is initialised: run it on every rank, not from the CLI")
            )
        else:
            run.append(impl)
            if impl.distributed:
                how[name] = "world of one, no communication"
    for kind, package in KNOWN_KINDS.items():
        if kind in impls:
            continue
        if kinds is not None and kind not in kinds:
            skipped.append((kind, "not in --kinds"))
        else:
            skipped.append((kind, _not_registered(kind, package)))
    return Selection(run, how, skipped)
