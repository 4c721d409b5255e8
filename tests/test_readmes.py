"""The READMEs are the packages' registry pages: their Python examples run, and a package README
links only to absolute URLs (a path into the repository does not exist on PyPI)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_READMES = sorted(ROOT.glob("packages/*/README.md"))
READMES = [ROOT / "README.md", *PACKAGE_READMES]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# A markdown link or image whose target has no scheme, or a repository path in backticks.
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+://|#)[^)]+\)")
REPO_PATH = re.compile(r"`(?:docs|examples|benchmarks|packages|tests)/[^`]*`")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("readme", READMES, ids=_ids(READMES))
def test_readme_examples_run(readme: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, match in enumerate(BLOCK.finditer(readme.read_text())):
        code = textwrap.dedent(match.group(1))
        exec(compile(code, f"{readme.relative_to(ROOT)}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("readme", PACKAGE_READMES, ids=_ids(PACKAGE_READMES))
def test_package_readme_has_no_repository_relative_links(readme: Path) -> None:
    text = readme.read_text()
    assert not RELATIVE_LINK.findall(text)
    assert not REPO_PATH.findall(text)
