"""What this process can run, read without importing torch._dynamo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import torch

from dilated.kernels import _capabilities


def test_capability_is_constant_to_torch_compile_as_the_decorator_makes_it() -> None:
    # The module marks the function as torch.compiler.assume_constant_result would, without
    # importing Dynamo at import time: if torch changes what the decorator does, this fails.
    def probe(index: int) -> int:
        return index

    marked = torch.compiler.assume_constant_result(probe)
    flags = {k: v for k, v in vars(marked).items() if k.startswith("_dynamo")}
    assert flags == {"_dynamo_marked_constant": True}
    assert _capabilities.cuda_capability_major._dynamo_marked_constant is True  # type: ignore[attr-defined]


def test_importing_every_package_leaves_dynamo_unloaded() -> None:
    # Every installed package (the per-package environments hold only some of them).
    names = [
        f"dilated.{p}"
        for p in ("core", "kernels", "ring", "sparse", "longnet")
        if importlib.util.find_spec(f"dilated.{p}") is not None
    ]
    code = f"import sys, {', '.join(names)}; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
