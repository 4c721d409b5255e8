"""Every Python snippet of the docs runs: each page's blocks in order, in one namespace.

A block whose first line is ``# not-run`` is skipped (blocks that need a GPU or several
processes); keep those few.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def test_pages_with_snippets_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "migration.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_snippets_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for i, match in enumerate(BLOCK.finditer(page.read_text())):
        code = match.group(1)
        if code.lstrip().startswith("# not-run"):
            continue
        exec(compile(code, f"{page.relative_to(DOCS)}[block {i}]", "exec"), namespace)
