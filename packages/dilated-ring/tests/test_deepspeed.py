"""A small model with ring dilated attention trains under DeepSpeed (ZeRO-2, CPU) and its loss
matches the same model trained without DeepSpeed on the whole sequence."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install 'dilated-ring[deepspeed]')",
    ),
]


@pytest.mark.parametrize("world", [1, 2])
def test_deepspeed_zero2_loss_matches_plain_training(world: int) -> None:
    import workers
    from distributed_harness import run_distributed

    run_distributed(workers.deepspeed_training, world, timeout=240)
