from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("sparse", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("sparse")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The spawned gloo ranks import their worker module by name from this folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _garbage_in_unfilled_accumulators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine leaves its accumulators unfilled when the first branch writes every row
    before anything merges into it: make such memory NaN, so a read of it fails the judge."""
    from dilated.sparse import engine

    def nan_filled(
        shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(engine, "_uninitialized", nan_filled)
