"""dilated-sparse installs into the shared PEP 420 namespace beside dilated-core."""

from __future__ import annotations

import importlib

import dilated
import dilated.core
import dilated.sparse


def test_namespace_has_no_init_and_holds_both_packages() -> None:
    assert getattr(dilated, "__file__", None) is None  # a namespace package has no __init__.py
    assert importlib.import_module("dilated.sparse").__version__ == "0.1.0"
    assert dilated.core.__version__ == "0.1.0"
