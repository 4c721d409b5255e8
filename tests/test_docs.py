"""Every Python snippet of the docs runs: each page's blocks in order, in one namespace.

A block whose fence carries the ``{.no-run}`` attribute (```` ```python {.no-run} ````) is skipped
(blocks that need a GPU, several processes or a download); keep those few. The attribute only adds
a class to the rendered block, so no marker shows on the page or in what the copy button copies.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Blocks may be indented (inside tabs or admonitions): the closing fence has the same indent.
BLOCK = re.compile(
    r"^( *)```python(?P<no_run>[ \t]*\{\.no-run\})?\n(?P<code>.*?)^\1```", re.S | re.M
)
# Every python fence, whatever follows the language: one with other attributes (or a misspelt
# ``{.no-run}``) is not collected by BLOCK and fails test_every_python_fence_is_collected.
FENCE = re.compile(r"```python\b")
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def test_pages_with_snippets_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "getting-started.md", "concepts.md", "migration.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_snippets_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for i, match in enumerate(BLOCK.finditer(page.read_text())):
        if match["no_run"]:
            continue
        code = textwrap.dedent(match["code"])
        exec(compile(code, f"{page.relative_to(DOCS)}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_python_fence_is_collected(page: Path) -> None:
    # A fence the pattern misses would be a snippet that silently never runs.
    text = page.read_text()
    assert len(BLOCK.findall(text)) == len(FENCE.findall(text))


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_no_marker_in_rendered_code(page: Path) -> None:
    # The old in-code marker showed on the page and went out with the copy button: the fence
    # attribute replaces it.
    for match in BLOCK.finditer(page.read_text()):
        assert not match["code"].lstrip().startswith("# not-run")


def test_scripts_and_formulas_need_no_cdn() -> None:
    # The display formulas are MathML, drawn by the browser: no MathJax, no CDN, so an offline
    # copy of the site shows them. A script or stylesheet the config names must be a local file.
    # (The theme's Google Fonts are the one remote asset left; offline, system fonts stand in.)
    config = (DOCS.parent / "mkdocs.yml").read_text()
    for block in re.findall(r"^extra_(?:javascript|css):\n((?:[ \t]+- .*\n)+)", config, re.M):
        assert "://" not in block
    assert "arithmatex" not in config
    for page in DOCS.rglob("*.md"):
        assert "$$" not in page.read_text(), f"{page}: TeX display math needs a script; use MathML"
    for asset in [*DOCS.rglob("*.js"), *DOCS.rglob("*.css")]:
        assert "://" not in asset.read_text(), asset


def test_sidebar_names_each_package_once() -> None:
    # Each package is one entry, its guide and API reference beneath it.
    yaml = pytest.importorskip("yaml")
    titles: list[str] = []

    def walk(items: list[object]) -> None:
        for item in items:
            if isinstance(item, dict):
                for title, value in item.items():
                    titles.append(title)
                    if isinstance(value, list):
                        walk(value)

    walk(yaml.safe_load((DOCS.parent / "mkdocs.yml").read_text())["nav"])
    for package in sorted((DOCS.parent / "packages").iterdir()):
        if (package / "pyproject.toml").exists():
            assert titles.count(package.name) == 1, (package.name, titles)
