"""A small text progress bar on stderr (dilated-core depends on torch alone)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, "bench") as bar: ... bar.update(label)``.

    Draws ``label [#####.....] 3/10 12.0s`` in place on a terminal, and one line per step when
    the stream is not a terminal (CI logs).
    """

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def update(self, note: str = "") -> None:
        """Count one step done; ``note`` says which."""
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"{self.label} [{bar}] {self.done}/{self.total} "
            f"{time.perf_counter() - self.start:.1f}s {note}"
        )
        self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
