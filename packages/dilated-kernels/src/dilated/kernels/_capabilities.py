"""What this process and its CUDA devices can run, read once and constant to ``torch.compile``.

``torch.compile`` does not trace ``importlib.util.find_spec`` or device queries; the backends'
availability checks read these values instead, so that a compiled call keeps its backend choice
without a graph break.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "HAS_FLASH_ATTN_4",
    "HAS_TRITON",
    "cuda_capability_major",
    "fused_float32_kernel",
    "has_cudnn_attention",
]

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def _has_flash_attn_4() -> bool:
    """Whether ``flash_attn.cute`` (flash-attn-4) is installed, found without importing it: the
    CuTe DSL takes seconds to import, and a flash-attn 2 package would load its CUDA extension."""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or spec.submodule_search_locations is None:
        return False
    return any(
        os.path.isfile(os.path.join(location, "cute", "interface.py"))
        for location in spec.submodule_search_locations
    )


HAS_FLASH_ATTN_4: bool = _has_flash_attn_4()

_MAJOR: dict[int, int] = {}


# Build properties of torch (no CUDA initialisation).
_HAS_CUDNN_ATTENTION: bool = hasattr(
    torch.ops.aten, "_scaled_dot_product_cudnn_attention"
) and bool(torch.backends.cudnn.is_available())


def has_cudnn_attention() -> bool:
    """Whether this PyTorch build has cuDNN's fused attention op (and cuDNN is usable)."""
    return _HAS_CUDNN_ATTENTION


def cuda_capability_major(device_index: int) -> int:
    """The compute capability's major version of CUDA device ``device_index`` (9: Hopper)."""
    major = _MAJOR.get(device_index)
    if major is None:
        major = _MAJOR[device_index] = torch.cuda.get_device_capability(device_index)[0]
    return int(major)


# What torch.compiler.assume_constant_result does (the compiled graph keeps the value, with no
# graph break), without calling it: it imports torch._dynamo, 3 s at import time.
# test_capabilities.py checks that the decorator still sets exactly this attribute.
cuda_capability_major._dynamo_marked_constant = True  # type: ignore[attr-defined]


def fused_float32_kernel(setting: bool | None, acc: torch.Tensor) -> bool:
    """Whether a one-launch Triton kernel updates the float32 accumulator ``acc``: the
    ``setting`` when it is forced (True/False), else for CUDA float32 accumulators where
    Triton is installed."""
    if setting is not None:
        return setting
    return acc.is_cuda and acc.dtype == torch.float32 and HAS_TRITON
