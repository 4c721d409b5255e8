"""A small model with sequence-parallel dilated attention trains under DeepSpeed ZeRO stages
1, 2 and 3 (CPU accelerator, 2 gloo ranks), through the helpers of :mod:`dilated.ring.deepspeed`
(sequence-parallel groups, activation checkpointing), and its loss matches the same model
trained without DeepSpeed on the whole sequence. One process spawn per stage."""

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


@pytest.mark.parametrize(("stage", "strategy"), [(1, "ring"), (2, "allgather"), (3, "ulysses")])
def test_deepspeed_zero_loss_matches_plain_training(stage: int, strategy: str) -> None:
    import workers
    from distributed_harness import run_distributed

    run_distributed(workers.deepspeed_training, 2, stage, strategy, timeout=300)
