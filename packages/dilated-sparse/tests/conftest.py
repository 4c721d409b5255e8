from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from dilated.core.settings import use_settings

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


@pytest.fixture
def emulated_flash4(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every block-sparse call takes the flash4 path, its flash-attn-4 calls run on the CPU
    stand-in of ``fa4_emulator`` (the tables, views, regions and merge are the real ones)."""
    import fa4_emulator

    from dilated.kernels import flash4_block_sparse
    from dilated.kernels.triton_kernels import interpreting

    if not interpreting():
        pytest.skip("the flash4 path's merge runs on CPU only under TRITON_INTERPRET=1")
    monkeypatch.setattr(flash4_block_sparse, "forward", fa4_emulator.forward)
    monkeypatch.setattr(flash4_block_sparse, "backward", fa4_emulator.backward)
    monkeypatch.setattr(flash4_block_sparse, "unsupported_reason", lambda *a, **k: None)
    with use_settings(sparse_flash4=True):
        yield
