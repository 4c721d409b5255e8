"""The ``"sdpa_flash"`` engine: PyTorch's own FlashAttention-2 kernels
(``aten._flash_attention_forward`` and ``aten._flash_attention_backward``).

It ships with every CUDA build of PyTorch, has no per-shape cost and the lightest host path
(C++ dispatch), so ``"auto"`` uses it for small calls, where the host sets the time
(``SMALL_CALL_WORK``), and for shapes cuDNN has not planned yet when flash-attn-4 is absent.
It reads ``(batch, rows, heads, head_dim)`` strided views in place (unit stride on
``head_dim``), grouped-query heads natively, and returns the float32 LSE; no key mask and no
dropout here (those go to ``"cudnn"``).
"""

from __future__ import annotations

import torch

from dilated.kernels._capabilities import cuda_capability_major
from dilated.kernels.engines.spec import SubproblemSpec

__all__ = [
    "FALLBACK",
    "HEAVY_HOST_PATH",
    "NAME",
    "PLANS_PER_SHAPE",
    "available",
    "backward",
    "forward",
    "unsupported_reason",
]

NAME = "sdpa_flash"
PLANS_PER_SHAPE = False
FALLBACK = False
HEAVY_HOST_PATH = False

_HAS_OPS: bool = hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(
    torch.ops.aten, "_flash_attention_backward"
)


def available(device: torch.device) -> bool:
    """CUDA on SM80 or newer, with a PyTorch build that has the flash kernels."""
    return (
        device.type == "cuda"
        and _HAS_OPS
        and torch.backends.cuda.is_flash_attention_available()
        and cuda_capability_major(device.index or 0) >= 8
    )


def unsupported_reason(spec: SubproblemSpec) -> str | None:
    """Why PyTorch's flash kernels cannot run a call of ``spec``, or None."""
    if spec.device_type != "cuda":
        return "PyTorch's flash kernels run on CUDA only"
    if not available(torch.device("cuda", spec.device_index)):
        return "this PyTorch build or GPU has no flash kernels (SM80 or newer)"
    if spec.dtype not in (torch.float16, torch.bfloat16):
        return f"PyTorch's flash kernels take float16/bfloat16, got {spec.dtype}"
    if spec.head_dim % 8 or spec.head_dim > 256:
        return (
            f"PyTorch's flash kernels take head_dim a multiple of 8 up to 256, got {spec.head_dim}"
        )
    if spec.empty:
        return "an empty sub-problem"
    if spec.is_causal and not spec.equal_rows:
        return "its causal mask is bottom-right aligned for unequal lengths (ours is top-left)"
    if spec.key_mask:
        return "PyTorch's flash kernels take no key mask"
    if spec.dropout:
        return "dropout runs on an engine whose backward replays the forward's mask (cudnn)"
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: see [`Engine.forward`][dilated.kernels.engines.spec.Engine.forward]."""
    res = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, is_causal, False, scale=scale
    )
    return res[0], res[1]


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    is_causal: bool,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    dropout_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: see [`Engine.backward`][dilated.kernels.engines.spec.Engine.backward]."""
    # Undefined cumulative lengths select the dense (not varlen) kernel; without dropout the
    # Philox state is never read.
    unused = q.new_empty(0, dtype=torch.int64)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad_out.to(q.dtype), q, k, v, out.to(q.dtype), lse.float().contiguous(), None, None,
        q.shape[1], k.shape[1], 0.0, is_causal, unused, unused, scale=scale,
    )  # fmt: skip
    return dq, dk, dv
