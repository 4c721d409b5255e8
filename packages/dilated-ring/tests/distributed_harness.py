"""The gloo process harness of the ring's distributed tests: dilated-core's shared one."""

from __future__ import annotations

from dilated.core.testing.distributed import TIMEOUT_S, run_distributed

__all__ = ["TIMEOUT_S", "run_distributed"]
