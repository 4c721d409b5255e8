"""The strided sub-problem backend (``"cudnn"``, ``"flash"``, and ``"auto"`` on CUDA): dense
engines on strided sub-problems, one fused Triton merge.

Every (branch, phase) of a run of segments is a batch of dense problems over a strided view of
the ``(batch, seq, heads, head_dim)`` input (rows ``s * w + p + r * i`` of heads ``p, p + r, ...``);
[`dilated.kernels.strided_plan`][dilated.kernels.strided_plan] groups them into as few engine
calls as the strides allow (phases of a branch share a call where they can) and caches that
plan per shape; [`dilated.kernels.strided_run`][dilated.kernels.strided_run] runs it. Each call
runs on the shared primitive
[`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] on a dense engine
(cuDNN, flash-attn-4, PyTorch's flash kernels; see
[`dilated.kernels.engines`][dilated.kernels.engines]), which reads such a view in place at full
speed and returns the float32 LSE. One Triton kernel
(``dilated.kernels.triton_kernels.gather_kernels``) then reads every piece of a block of rows
and writes the LSE-merged output and LSE once. ``backend="cudnn"`` names the cuDNN engine,
``backend="flash"`` flash-attn-4, and ``"auto"`` lets each call choose.

Backward: with the merged output ``O`` and LSE ``L`` the branches form one softmax, so each
piece's gradient is the ordinary attention backward evaluated with ``O`` and ``L`` in place of
its own (``dS = P (dP - rowsum(dO * O))``, ``P = exp(S - L)``): the engines' backward kernels take
exactly those inputs. A second Triton kernel sums the pieces' dq, dk and dv. A gradient on the
returned LSE (ring merges) goes through the ``"triton"`` backward, which takes it.

Long sequences are processed in chunks of whole segments of every branch, so the pieces'
buffers stay bounded (4M-token forward and 2M-token training fit on one 80 GB GPU).

Supports float16/bfloat16 on CUDA (sm80+), ``head_dim`` a multiple of 8 up to 256 on Hopper (128
before), causal, grouped-query heads, any sequence length; a key padding mask and dropout on the
cuDNN engine with ``head_dim`` 64, 128 or 256 (``"auto"`` sends other such calls to
``"triton"``). Under ``TRITON_INTERPRET=1`` on CPU the engine calls run on the ``"reference"``
engine, which is how CI tests the planning and the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.caching import plan_cache
from dilated.core.reference import draw_dropout_seed, dropout_seed_value
from dilated.kernels import strided_run
from dilated.kernels._capabilities import HAS_TRITON, cuda_capability_major, has_cudnn_attention
from dilated.kernels.custom_op import define_attention_op
from dilated.kernels.engines import SubproblemSpec, get_engine
from dilated.kernels.engines import cudnn as cudnn_engine
from dilated.kernels.engines import flash4 as flash4_engine
from dilated.kernels.strided_run import StridedCall, contiguous, readable
from dilated.kernels.triton_kernels import interpreting

__all__ = [
    "NAME",
    "available",
    "backward_from_merged",
    "forward",
    "forward_no_grad",
    "unsupported_reason",
]

NAME = "cudnn"


def available(device: torch.device) -> bool:
    """CUDA with cuDNN attention (sm80+) and triton; or CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        return has_cudnn_attention() and cuda_capability_major(index) >= 8
    return device.type == "cpu" and interpreting()


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    engine: str = cudnn_engine.NAME,
) -> str | None:
    """Why this backend cannot take the call on ``engine`` (``"cudnn"``, ``"flash4"`` or
    ``"auto"``: either of them), or None when it can (worked out once per kind of call)."""
    spec = SubproblemSpec.of(q, k, is_causal=False, key_mask=key_padding_mask, dropout_p=dropout_p)
    return _reason(spec, engine, not q.is_cuda and interpreting())


@plan_cache(
    "dilated.kernels.backends.cudnn.unsupported_reason",
    maxsize=256,
    key="(SubproblemSpec of the whole call, engine, TRITON_INTERPRET on CPU)",
)
def _reason(spec: SubproblemSpec, engine: str, interpret: bool) -> str | None:
    # ``interpret``: part of the key only (TRITON_INTERPRET decides availability on CPU).
    if engine != cudnn_engine.NAME:
        flash_reason = flash4_engine.unsupported_reason(spec)
        if engine == flash4_engine.NAME or flash_reason is None:
            return flash_reason
    cuda = spec.device_type == "cuda"
    if not available(torch.device(spec.device_type, spec.device_index)):
        return f"it needs triton and a CUDA device with cuDNN attention (got {spec.device_type})"
    # float32 runs only on CPU under the interpreter (the tests); the LSE is float32 there.
    if spec.dtype not in (torch.float16, torch.bfloat16, *(() if cuda else (torch.float32,))):
        return f"it takes float16/bfloat16 on CUDA, got {spec.dtype}; use backend='triton'"
    limit = cudnn_engine.max_head_dim(spec.device_index) if cuda else 256
    if spec.head_dim > limit or spec.head_dim % 8:
        return f"head_dim must be a multiple of 8 up to {limit} on this device, got {spec.head_dim}"
    if not cuda:
        return None
    return cudnn_engine.extras_reason(spec.head_dim, spec.key_mask, spec.dropout)


def forward_no_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a call this backend supports (no dropout), outside autograd (for callers
    that merge it with other parts; see [`dilated.kernels.partial`][dilated.kernels.partial])."""
    call = StridedCall(tuple(segment_lengths), tuple(dilation_rates), scale, is_causal, 0.0, engine)
    mask = contiguous(key_padding_mask)
    return strided_run.forward(readable(q), readable(k), readable(v), mask, call, None)


def backward_from_merged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this call's branches given the FINAL merged ``out`` ``(b, n, h, d)``
    and float32 ``lse`` ``(b, h, n)``, which may include keys of other parts."""
    call = StridedCall(tuple(segment_lengths), tuple(dilation_rates), scale, is_causal, 0.0, engine)
    mask = contiguous(key_padding_mask)
    return strided_run.backward(
        readable(q),
        readable(k),
        readable(v),
        mask,
        readable(out.to(q.dtype)),
        lse.float().contiguous(),
        grad_out,
        call,
        None,
    )


_OPTIONS = (
    "int[] segment_lengths, int[] dilation_rates, float scale, bool is_causal, float dropout_p, "
    'str engine="auto", int[] bounds=[]'
)


def _call(
    ws: Sequence[int],
    rs: Sequence[int],
    scale: float,
    is_causal: bool,
    dropout_p: float,
    engine: str = "auto",
    bounds: Sequence[int] = (),
) -> StridedCall:
    return StridedCall(tuple(ws), tuple(rs), scale, is_causal, dropout_p, engine, tuple(bounds))


def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = _call(segment_lengths, dilation_rates, *opts)
    mask = contiguous(key_mask)
    return strided_run.forward(
        readable(q), readable(k), readable(v), mask, call, dropout_seed_value(seed)
    )


def _attention_backward_impl(
    d_out: torch.Tensor,
    d_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor | None,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call(segment_lengths, dilation_rates, *opts)
    key_mask = contiguous(key_mask)
    if d_lse is None:
        q, k, v, out = readable(q), readable(k), readable(v), readable(out)
        return strided_run.backward(
            q, k, v, key_mask, out, lse.contiguous(), d_out, call, dropout_seed_value(seed)
        )
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    if call.dropout_p > 0.0:
        raise ValueError(
            "backend='cudnn' cannot take a gradient on the returned LSE with dropout; "
            "use backend='reference'"
        )
    # The LSE's gradient changes dS = P (dP - D) into P (dP - D + dL), which cuDNN's backward
    # cannot take; the fused Triton backward does.
    from dilated.kernels.backends import triton as triton_backend

    mask = None if key_mask is None else key_mask.to(torch.int8)
    if not call.bounds:
        return triton_backend.backward(
            q, k, v, mask, out, lse, d_out, d_lse, call.ws, call.rs, call.scale, call.is_causal
        )
    grads = tuple(torch.zeros_like(x) for x in (q, k, v))
    for rows in strided_run.sequences(call, q.shape[1]):
        # The fused kernel reads contiguous tensors of its own length.
        part = triton_backend.backward(
            q[:, rows].contiguous(), k[:, rows].contiguous(), v[:, rows].contiguous(),
            None if mask is None else mask[:, rows].contiguous(),
            out[:, rows].contiguous(), lse[:, :, rows].contiguous(),
            d_out[:, rows].contiguous(), d_lse[:, :, rows].contiguous(),
            call.ws, call.rs, call.scale, call.is_causal,
        )  # fmt: skip
        for grad, g in zip(grads, part):
            grad[:, rows] = g
    return grads[0], grads[1], grads[2]


_attend = define_attention_op(
    "dilated_kernels::cudnn_attention",
    _OPTIONS,
    _attention_impl,
    _attention_backward_impl,
    lse_grad=True,
    lse_dtype=lambda dtype: torch.float32,
)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    engine: str = cudnn_engine.NAME,
    sequence_bounds: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on validated inputs ``(batch, seq, heads, head_dim)``, the sub-problems
    on ``engine`` (``"cudnn"``, ``"flash4"`` or ``"auto"``).

    ``sequence_bounds``: the checked ``cu_seqlens`` of a packed batch of one (see
    [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]), each sequence attended alone,
    all of them in this one call; empty: one sequence.

    Returns ``out`` in the dtype of ``q`` and ``lse`` float32 ``(batch, heads, seq)``.

    Raises:
        ValueError: a call this backend cannot run (the message names the backend that can).
    """
    if engine != "auto":
        get_engine(engine)  # an unknown name fails here, naming the valid ones
    reason = unsupported_reason(q, k, key_padding_mask, dropout_p, engine)
    if reason is not None:
        name = "flash" if engine == flash4_engine.NAME else NAME
        raise ValueError(f"backend={name!r} cannot run this call: {reason}")
    seed = draw_dropout_seed(dropout_p)
    out, lse = _attend(
        q,
        k,
        v,
        key_padding_mask,
        seed,
        list(segment_lengths),
        list(dilation_rates),
        scale,
        is_causal,
        dropout_p,
        engine,
        list(sequence_bounds),
    )
    return out, lse
