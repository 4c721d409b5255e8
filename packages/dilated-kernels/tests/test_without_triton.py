"""dilated-kernels on a torch without triton (a CPU-only install): it imports, lists no Triton
backend, and ``backend="auto"`` computes the judge's result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError
    import functools
    import torch
    import dilated.kernels as dk
    from dilated.core.testing import check_on_random_inputs

    names = dk.available_backends(torch.device("cpu"))
    assert "triton" not in names and "cudnn" not in names, names
    attention = functools.partial(dk.dilated_attention, return_lse=True, backend="auto")
    check_on_random_inputs(attention, 2, 24, 4, 8, [8, 16], [1, 2], is_causal=True, padding=True)
    assert sys.modules["triton"] is None
    print("ok", names)
    """
)


def test_kernels_work_without_triton() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
