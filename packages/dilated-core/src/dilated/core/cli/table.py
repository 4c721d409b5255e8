"""Plain-text tables for the subcommands' output."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Numbers, possibly with a unit ("12.5", "1.2e-05", "3,000", "4.0 MiB") and the placeholders
# that stand in for them: such columns are right-aligned so that digits line up.
_NUMERIC = re.compile(r"^([-+]?[\d.,]+(e[-+]?\d+)?( [A-Za-z]+)?|-|OOM|skipped)$")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, a rule under the header.

    Numeric columns are right-aligned, text columns left-aligned.
    """
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(cells[1:]) and all(_NUMERIC.match(r[i]) for r in cells[1:])
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        text = "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)
        )
        return text.rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)
