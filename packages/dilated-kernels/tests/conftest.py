from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

settings.register_profile("kernels", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("kernels")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def interpret() -> Iterator[None]:
    """Run Triton kernels under the interpreter (chosen when a kernel module is first imported)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
