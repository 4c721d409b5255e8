"""The ``"cudnn"`` backend: cuDNN attention on strided sub-problems, one fused Triton merge.

Every (branch, phase) of a run of segments is a batch of dense problems over a strided view of
the ``(batch, seq, heads, head_dim)`` input (rows ``s * w + p + r * i`` of heads ``p, p + r, ...``);
cuDNN's fused attention reads such a view in place at full speed and returns the float32 LSE.
One Triton kernel (``_gather_kernels``) then reads every piece of a block of rows and writes
the LSE-merged output and LSE once.

Backward: with the merged output ``O`` and LSE ``L`` the branches form one softmax, so each
piece's gradient is the ordinary attention backward evaluated with ``O`` and ``L`` in place of
its own (``dS = P (dP - rowsum(dO * O))``, ``P = exp(S - L)``): cuDNN's backward kernel takes
exactly those inputs. A second Triton kernel sums the pieces' dq, dk and dv. A gradient on the
returned LSE (ring merges) goes through the ``"triton"`` backward, which takes it.

Long sequences are processed in chunks of whole segments of every branch, so the pieces'
buffers stay bounded (4M-token forward and 2M-token training fit on one 80 GB GPU).

Supports float16/bfloat16 on CUDA (sm80+), head_dim a multiple of 8 up to 128, causal, any sequence length.
No key padding mask, grouped-query attention or dropout: ``"auto"`` sends those calls to
``"triton"`` (mask, GQA) or ``"sdpa"`` (dropout). Under ``TRITON_INTERPRET=1`` on CPU the cuDNN
calls are replaced by the same math in PyTorch, which is how CI tests the planning and the
Triton kernels.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dilated.kernels.subproblem import (
    has_cudnn_attention,
    subproblem_attention,
    subproblem_attention_backward,
)

__all__ = [
    "NAME",
    "available",
    "backward_from_merged",
    "forward",
    "forward_no_grad",
    "unsupported_reason",
]

NAME = "cudnn"

#: Elements (``batch * tokens * heads * head_dim``) one chunk may hold; its pieces' buffers take
#: about 2 bytes x 1.75 of that for rates (1, 2, 4), three times that in backward.
CHUNK_ELEMENTS = 1 << 28

#: Rows per program of the gather kernels, and the largest block the per-program table lookup
#: may use (when every ``w_i`` is a multiple of it).
_BLOCK_T = 32
_BLOCK_T_SCALAR = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """CUDA with cuDNN attention (sm80+) and triton; or CPU under ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return (
            has_cudnn_attention()
            and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 8
        )
    return device.type == "cpu" and _interpreting()


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, dropout_p: float
) -> str | None:
    """Why this backend cannot take the call, or None when it can."""
    if dropout_p > 0.0:
        return "it has no dropout; use backend='sdpa' or 'reference'"
    if key_padding_mask is not None:
        return "it has no key padding mask; use backend='triton'"
    if k.shape[2] != q.shape[2]:
        return "it has no grouped-query attention (kv_heads != heads); use backend='triton'"
    if not available(q.device):
        return f"it needs triton and a CUDA device with cuDNN attention (got {q.device.type})"
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16/bfloat16 on CUDA, got {q.dtype}; use backend='triton'"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head_dim must be a multiple of 8 up to 128, got {q.shape[-1]}"
    return None


@dataclass(frozen=True)
class _Piece:
    """One dense call: ``count`` segments of branch ``branch`` for phase ``phase``.

    The call's batch is ``batches * count`` problems of ``rows`` queries; ``batches > 1`` only
    when the segments tile the whole sequence, which is what makes (batch, segment) one stride.
    """

    branch: int
    w: int
    r: int
    phase: int
    start: int
    count: int
    rows: int
    partial: bool
    batch0: int
    batches: int


def _chunk_length(b: int, n: int, h: int, d: int, ws: Sequence[int]) -> int:
    """Tokens per chunk: a multiple of every ``w_i`` (segments never straddle two chunks)."""
    step = math.lcm(*ws)
    if step >= n:
        return n
    chunk = step * max(1, CHUNK_ELEMENTS // (step * b * h * d))
    return min(chunk, n)


def _plan(
    b: int, n: int, h: int, ws: Sequence[int], rs: Sequence[int], t0: int, t1: int
) -> list[_Piece]:
    """Every dense call of the chunk ``[t0, t1)`` (``t0`` a multiple of every ``w_i``)."""
    pieces = []
    for i, (w, r) in enumerate(zip(ws, rs)):
        full_stop = min(t1, (n // w) * w)
        count = max(0, (full_stop - t0) // w)
        tail = n - (n // w) * w if t1 == n else 0
        for p in range(min(r, h)):
            if count:
                merged = b == 1 or count * w == n
                for b0 in [0] if merged else range(b):
                    pieces.append(
                        _Piece(i, w, r, p, t0, count, w // r, False, b0, b if merged else 1)
                    )
            rows = len(range(p, tail, r))
            if rows:
                for b0 in range(b):
                    pieces.append(_Piece(i, w, r, p, n - tail, 1, rows, True, b0, 1))
    return pieces


def _view(x: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """``(B, rows, heads of the phase, head_dim)`` strided view of contiguous ``x`` for ``piece``."""
    sb, sn, sh, _ = x.stride()
    heads = len(range(piece.phase, x.shape[2], piece.r))
    return x.as_strided(
        (piece.batches * piece.count, piece.rows, heads, x.shape[3]),
        (piece.w * sn, piece.r * sn, piece.r * sh, 1),
        x.storage_offset()
        + piece.batch0 * sb
        + (piece.start + piece.phase) * sn
        + piece.phase * sh,
    )


def _lse_view(lse: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """The rows of the merged ``lse`` ``(batch, heads, seq)`` for ``piece``, as ``(B, H, rows)``."""
    sb, sh, sn = lse.stride()
    heads = len(range(piece.phase, lse.shape[1], piece.r))
    part = lse.as_strided(
        (piece.batches, heads, piece.count, piece.rows),
        (sb, piece.r * sh, piece.w * sn, piece.r * sn),
        lse.storage_offset() + piece.batch0 * sb + piece.phase * sh + piece.start + piece.phase,
    )
    return part.permute(0, 2, 1, 3).reshape(piece.batches * piece.count, heads, piece.rows)


def _table(
    pieces: Sequence[_Piece],
    values: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor] | None,
    b: int,
    n_branches: int,
    rmax: int,
    device: torch.device,
) -> torch.Tensor:
    """Rows of ``_gather_kernels``: where each (branch, phase, batch, partial) piece lives."""
    from dilated.kernels.backends._gather_kernels import ROW_FIELDS

    table = torch.zeros(n_branches, rmax, b, 2, int(ROW_FIELDS), dtype=torch.int64)
    for k, (piece, val) in enumerate(zip(pieces, values)):
        lse = None if lses is None else lses[k]
        for bi in range(piece.batch0, piece.batch0 + piece.batches):
            skip = (bi - piece.batch0) * piece.count
            row = [
                val.data_ptr() + skip * val.stride(0) * val.element_size(),
                0 if lse is None else lse.data_ptr() + skip * lse.stride(0) * 4,
                val.stride(0),
                val.stride(1),
                val.stride(2),
                0 if lse is None else lse.stride(0),
                0 if lse is None else lse.stride(2),
                0 if lse is None else lse.stride(1),
                piece.start // piece.w,
            ]
            table[piece.branch, piece.phase, bi, int(piece.partial)] = torch.tensor(row)
    if device.type != "cuda":
        return table.to(device)
    # Pinned and asynchronous: a pageable copy would wait for every queued kernel.
    return table.pin_memory().to(device, non_blocking=True)


def _chunks(b: int, n: int, h: int, d: int, ws: Sequence[int]) -> list[tuple[int, int]]:
    step = _chunk_length(b, n, h, d, ws)
    return [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]


#: CUDA's limit on the second grid dimension (row blocks); longer ranges take several launches.
_MAX_GRID_Y = 65535


def _gather_launches(
    ws: Sequence[int], rs: Sequence[int], rmax: int, t0: int, t1: int, b: int, h: int, d: int
) -> list[dict[str, Any]]:
    """Grid, row range and block options of each gather-kernel launch for ``[t0, t1)``."""
    block = math.gcd(*ws, _BLOCK_T_SCALAR)
    scalar = block >= 16
    block = block if scalar else _BLOCK_T
    span = block * _MAX_GRID_Y
    return [
        {
            "grid": (b * h, -(-(min(t1, s + span) - s) // block)),
            "t_start": s,
            "t_stop": min(t1, s + span),
            "SCALAR": scalar,
            "BLOCK_T": block,
            "D": d,
            "BLOCK_D": max(16, 1 << (d - 1).bit_length()),
            "RMAX": rmax,
            "WS": tuple(ws),
            "RS": tuple(rs),
        }
        for s in range(t0, t1, span)
    ]


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    scale: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from dilated.kernels.backends._gather_kernels import gather_pieces

    b, n, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    rmax = max(min(r, h) for r in rs)
    for t0, t1 in _chunks(b, n, h, d, ws):
        pieces = _plan(b, n, h, ws, rs, t0, t1)
        results = [
            subproblem_attention(
                _view(q, pc), _view(k, pc), _view(v, pc), scale=scale, is_causal=is_causal
            )
            for pc in pieces
        ]
        table = _table(
            pieces, [o for o, _ in results], [m for _, m in results], b, len(ws), rmax, q.device
        )
        for opts in _gather_launches(ws, rs, rmax, t0, t1, b, h, d):
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
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    scale: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dilated.kernels.backends._gather_kernels import gather_pieces

    b, n, h, d = q.shape
    do = grad_out.to(q.dtype).contiguous()
    grads = [torch.empty_like(x) for x in (q, k, v)]
    rmax = max(min(r, h) for r in rs)
    for t0, t1 in _chunks(b, n, h, d, ws):
        pieces = _plan(b, n, h, ws, rs, t0, t1)
        results = [
            subproblem_attention_backward(
                _view(do, pc),
                _view(q, pc),
                _view(k, pc),
                _view(v, pc),
                _view(out, pc),
                _lse_view(lse, pc),
                scale=scale,
                is_causal=is_causal,
            )
            for pc in pieces
        ]
        for which, grad in enumerate(grads):
            table = _table(pieces, [g[which] for g in results], None, b, len(ws), rmax, q.device)
            for opts in _gather_launches(ws, rs, rmax, t0, t1, b, h, d):
                gather_pieces[opts.pop("grid")](
                    table, grad, grad, n=n, B=b, H=h,
                    sob=grad.stride(0), son=grad.stride(1), soh=grad.stride(2),
                    slb=0, slh=0, MERGE=False, **opts,
                )  # fmt: skip
    dq, dk, dv = grads
    return dq, dk, dv


def forward_no_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a call this backend supports, outside autograd (for callers that merge
    it with other parts; see [`dilated.kernels.partial`][dilated.kernels.partial])."""
    return _forward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        tuple(segment_lengths),
        tuple(dilation_rates),
        scale,
        is_causal,
    )


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this call's branches given the FINAL merged ``out`` ``(b, n, h, d)``
    and float32 ``lse`` ``(b, h, n)``, which may include keys of other parts."""
    return _backward(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.to(q.dtype).contiguous(),
        lse.float().contiguous(),
        grad_out,
        tuple(segment_lengths),
        tuple(dilation_rates),
        scale,
        is_causal,
    )


class _CudnnDilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ws: tuple[int, ...],
        rs: tuple[int, ...],
        scale: float,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _forward(q, k, v, ws, rs, scale, is_causal)
        # Unused outputs get None, not a zero tensor: most calls never use the LSE.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (ws, rs, scale, is_causal)
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ws, rs, scale, is_causal = ctx.config
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is not None:
            from dilated.kernels.backends import triton as triton_backend

            grads = triton_backend.backward(
                q, k, v, None, out, lse, grad_out, grad_lse, ws, rs, scale, is_causal
            )
        else:
            grads = _backward(q, k, v, out, lse, grad_out, ws, rs, scale, is_causal)
        return (*grads, None, None, None, None)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` on validated inputs ``(batch, seq, heads, head_dim)``.

    Returns ``out`` in the dtype of ``q`` and ``lse`` float32 ``(batch, heads, seq)``.

    Raises:
        ValueError: a call this backend cannot run (the message names the backend that can).
    """
    reason = unsupported_reason(q, k, key_padding_mask, dropout_p)
    if reason is not None:
        raise ValueError(f"backend='cudnn' cannot run this call: {reason}")
    out, lse = _CudnnDilatedAttentionFn.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        tuple(segment_lengths),
        tuple(dilation_rates),
        scale,
        is_causal,
    )
    return out, lse
