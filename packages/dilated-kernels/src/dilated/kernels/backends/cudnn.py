"""The strided sub-problem backend (``"cudnn"``, ``"flash"``, and ``"auto"`` on CUDA): dense
engines on strided sub-problems, one fused Triton merge.

Every (branch, phase) of a run of segments is a batch of dense problems over a strided view of
the ``(batch, seq, heads, head_dim)`` input (rows ``s * w + p + r * i`` of heads ``p, p + r, ...``);
[`dilated.kernels.strided_plan`][dilated.kernels.strided_plan] groups them into as few engine
calls as the strides allow (phases of a branch share a call where they can) and caches that
plan per shape. Each call runs on the shared primitive
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
from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.reference import call_dropout_seed, draw_dropout_seed, dropout_seed_value
from dilated.kernels._capabilities import HAS_TRITON, cuda_capability_major, has_cudnn_attention
from dilated.kernels._tables import upload
from dilated.kernels.custom_op import register_attention_autograd
from dilated.kernels.engines import SubproblemSpec, get_engine
from dilated.kernels.engines import cudnn as cudnn_engine
from dilated.kernels.engines import flash4 as flash4_engine
from dilated.kernels.strided_plan import (
    DenseCall,
    chunks,
    gather_launches,
    gather_table,
    kv_layout,
    lse_view,
    mask_view,
    plan,
    view,
)
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward
from dilated.kernels.triton_kernels import interpreter_lock, interpreting

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
    ``"auto"``: either of them), or None when it can."""
    if engine != cudnn_engine.NAME:
        spec = SubproblemSpec.of(
            q, k, is_causal=False, key_mask=key_padding_mask, dropout_p=dropout_p
        )
        flash_reason = flash4_engine.unsupported_reason(spec)
        if engine == flash4_engine.NAME or flash_reason is None:
            return flash_reason
    if not available(q.device):
        return f"it needs triton and a CUDA device with cuDNN attention (got {q.device.type})"
    # float32 runs only on CPU under the interpreter (the tests); the LSE is float32 there.
    if q.dtype not in (torch.float16, torch.bfloat16, *(() if q.is_cuda else (torch.float32,))):
        return f"it takes float16/bfloat16 on CUDA, got {q.dtype}; use backend='triton'"
    limit = cudnn_engine.max_head_dim(q.device.index or 0) if q.is_cuda else 256
    if q.shape[-1] > limit or q.shape[-1] % 8:
        return f"head_dim must be a multiple of 8 up to {limit} on this device, got {q.shape[-1]}"
    if not q.is_cuda:
        return None
    return cudnn_engine.extras_reason(q.shape[-1], key_padding_mask is not None, dropout_p > 0.0)


@dataclass(frozen=True)
class _CallOptions:
    """What every piece of one call shares: the branches and options."""

    ws: tuple[int, ...]
    rs: tuple[int, ...]
    scale: float
    is_causal: bool
    dropout_p: float
    engine: str = "auto"


def _piece_options(
    call: _CallOptions, piece: DenseCall, mask: torch.Tensor | None, seed: int | None
) -> dict[str, Any]:
    """The keywords of the primitive's call for ``piece``, forward and backward alike."""
    return {
        "scale": call.scale,
        "is_causal": call.is_causal,
        "key_mask": mask_view(mask, piece),
        "dropout_p": call.dropout_p,
        "dropout_seed": seed,
        "engine": call.engine,
    }


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _expanded(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.repeat_interleave(h // x.shape[2], dim=2)


def _folded(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    b, n, h, d = dx.shape
    return dx.view(b, n, hkv, h // hkv, d).sum(3, dtype=torch.float32).to(dx.dtype)


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: _CallOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``k``, ``v`` as the pieces read them, and their group (0: one per query head)."""
    h, hkv = q.shape[2], k.shape[2]
    layout = kv_layout(h, hkv, call.rs)
    if layout == "expand":
        return _expanded(k, h), _expanded(v, h), 0
    return k, v, (0 if layout == "mha" else h // hkv)


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    call: _CallOptions,
    seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from dilated.kernels.triton_kernels.gather_kernels import gather_pieces

    b, n, h, d = q.shape
    ws, rs = call.ws, call.rs
    k, v, group = _prepare(q, k, v, call)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    rmax = max(min(r, h) for r in rs)
    index = 0
    for t0, t1 in chunks(b, n, h, d, ws):
        pieces = plan(b, n, h, ws, rs, t0, t1, group, mask is not None)
        results = []
        for pc in pieces:
            results.append(
                subproblem_attention(
                    view(q, pc), view(k, pc, h, group), view(v, pc, h, group),
                    **_piece_options(call, pc, mask, call_dropout_seed(seed, index)),
                )
            )  # fmt: skip
            index += 1
        # Under capture the addresses in it are the graph's own, so they stay valid at replays.
        table = upload(
            gather_table(
                pieces, [o for o, _ in results], [m for _, m in results], b, len(ws), rmax
            ),
            q.device,
        )
        for opts in gather_launches(ws, rs, rmax, t0, t1, b, h, d):
            with interpreter_lock():
                gather_pieces[opts.pop("grid")](
                    table, out, lse, n=n, B=b, H=h,
                    sob=out.stride(0), son=out.stride(1), soh=out.stride(2),
                    slb=lse.stride(0), slh=lse.stride(1), MERGE=True, **opts,
                )  # fmt: skip
    return out, lse


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    call: _CallOptions,
    seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dilated.kernels.triton_kernels.gather_kernels import gather_pieces

    b, n, h, d = q.shape
    hkv = k.shape[2]
    ws, rs = call.ws, call.rs
    ke, ve, group = _prepare(q, k, v, call)
    do = grad_out.to(q.dtype).contiguous()
    grads = [torch.empty_like(q), torch.empty_like(ke), torch.empty_like(ve)]
    rmax = max(min(r, h) for r in rs)
    index = 0
    for t0, t1 in chunks(b, n, h, d, ws):
        pieces = plan(b, n, h, ws, rs, t0, t1, group, mask is not None)
        results = []
        for pc in pieces:
            results.append(
                subproblem_attention_backward(
                    view(do, pc), view(q, pc), view(ke, pc, h, group), view(ve, pc, h, group),
                    view(out, pc), lse_view(lse, pc),
                    **_piece_options(call, pc, mask, call_dropout_seed(seed, index)),
                )
            )  # fmt: skip
            index += 1
        # The three gradients' tables travel to the device in one copy.
        tables = upload(
            torch.stack(
                [
                    gather_table(pieces, [g[w] for g in results], None, b, len(ws), rmax)
                    for w in range(3)
                ]
            ),
            q.device,
        )
        for which, (grad, table) in enumerate(zip(grads, tables)):
            heads = grad.shape[2]
            for opts in gather_launches(
                ws, rs, rmax, t0, t1, b, heads, d, kv_group=group if which else 0
            ):
                with interpreter_lock():
                    gather_pieces[opts.pop("grid")](
                        table, grad, grad, n=n, B=b, H=heads,
                        sob=grad.stride(0), son=grad.stride(1), soh=grad.stride(2),
                        slb=0, slh=0, MERGE=False, **opts,
                    )  # fmt: skip
    dq, dk, dv = grads
    if dk.shape[2] != hkv:
        dk, dv = _folded(dk, hkv), _folded(dv, hkv)
    return dq, dk, dv


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
    call = _CallOptions(
        tuple(segment_lengths), tuple(dilation_rates), scale, is_causal, 0.0, engine
    )
    mask = _contiguous(key_padding_mask)
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), mask, call, None)


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
    call = _CallOptions(
        tuple(segment_lengths), tuple(dilation_rates), scale, is_causal, 0.0, engine
    )
    mask = _contiguous(key_padding_mask)
    return _backward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        mask,
        out.to(q.dtype).contiguous(),
        lse.float().contiguous(),
        grad_out,
        call,
        None,
    )


_OPTIONS = (
    "int[] segment_lengths, int[] dilation_rates, float scale, bool is_causal, float dropout_p, "
    'str engine="auto"'
)


def _call(ws: Sequence[int], rs: Sequence[int], *opts: Any) -> _CallOptions:
    return _CallOptions(tuple(ws), tuple(rs), *opts)


@torch.library.custom_op(
    "dilated_kernels::cudnn_attention",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? seed, {_OPTIONS}) "
    "-> (Tensor, Tensor)",
)
def _attention(
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
    mask = _contiguous(key_mask)
    return _forward(
        q.contiguous(), k.contiguous(), v.contiguous(), mask, call, dropout_seed_value(seed)
    )


@_attention.register_fake
def _attention_fake(q: torch.Tensor, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op(
    "dilated_kernels::cudnn_attention_backward",
    mutates_args=(),
    schema="(Tensor d_out, Tensor? d_lse, Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
    f"Tensor out, Tensor lse, Tensor? seed, {_OPTIONS}) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward(
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
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    key_mask = _contiguous(key_mask)
    if d_lse is None:
        return _backward(
            q, k, v, key_mask, out, lse.contiguous(), d_out, call, dropout_seed_value(seed)
        )
    if call.dropout_p > 0.0:
        raise ValueError(
            "backend='cudnn' cannot take a gradient on the returned LSE with dropout; "
            "use backend='reference'"
        )
    # The LSE's gradient changes dS = P (dP - D) into P (dP - D + dL), which cuDNN's backward
    # cannot take; the fused Triton backward does.
    from dilated.kernels.backends import triton as triton_backend

    mask = None if key_mask is None else key_mask.to(torch.int8)
    return triton_backend.backward(
        q, k, v, mask, out, lse, d_out, d_lse, call.ws, call.rs, call.scale, call.is_causal
    )


@_attention_backward.register_fake
def _attention_backward_fake(
    d_out: torch.Tensor, d_lse: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(_attention, _attention_backward, lse_grad=True)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on validated inputs ``(batch, seq, heads, head_dim)``, the sub-problems
    on ``engine`` (``"cudnn"``, ``"flash4"`` or ``"auto"``).

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
    out, lse = torch.ops.dilated_kernels.cudnn_attention(
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
    )
    return out, lse
