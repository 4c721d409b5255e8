"""Run a dilated call as planned by [`strided_plan`][dilated.kernels.strided_plan]: the engine
calls on strided views, then the Triton merge (forward) or sum (backward) of their results into
``(batch, seq, heads, head_dim)``; no autograd (see
``dilated.kernels.backends.cudnn`` for the op around it).

A packed batch (``cu_seqlens``) runs in the same call: each sequence's rows are views of the
batch of one, read and written in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dilated.core.packed import sequence_slices
from dilated.core.reference import call_dropout_seed
from dilated.kernels._tables import upload
from dilated.kernels.piece_gather import merge_pieces, sum_pieces
from dilated.kernels.strided_plan import (
    DenseCall,
    chunks,
    gather_table,
    kv_layout,
    lse_view,
    mask_view,
    plan,
    view,
)
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward

__all__ = ["StridedCall", "backward", "contiguous", "forward", "readable", "sequences"]


@dataclass(frozen=True)
class StridedCall:
    """What every engine call of one dilated call shares: the branches and options."""

    ws: tuple[int, ...]
    rs: tuple[int, ...]
    scale: float
    is_causal: bool
    dropout_p: float
    engine: str = "auto"
    #: ``cu_seqlens`` of a packed batch of one (each sequence attended alone), or empty.
    bounds: tuple[int, ...] = ()


def _piece_options(
    call: StridedCall, piece: DenseCall, mask: torch.Tensor | None, seed: int | None
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


def contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` contiguous, or None."""
    return None if x is None else x.contiguous()


def readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, seq, heads, head_dim)`` as the engines read it in place: ``x`` itself when
    ``head_dim`` is unit-stride and its address and every other stride are multiples of 16
    bytes (any order: a ``(batch, heads, seq, head_dim)`` tensor transposed, as transformers
    passes them, is read without a copy); a contiguous copy otherwise."""
    if x.is_contiguous():
        return x  # what the copy below would return (the usual case: a cheap exit)
    align = max(1, 16 // x.element_size())
    strides = x.stride()
    if (
        strides[-1] == 1
        and x.data_ptr() % 16 == 0
        and all(s % align == 0 for s in strides[:-1])
        and _non_overlapping(x)
    ):
        return x
    return x.contiguous()


def _non_overlapping(x: torch.Tensor) -> bool:
    # Sorted by stride, each dimension must step past the whole extent of the smaller ones.
    extent = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda p: p[1]):
        if size > 1 and stride < extent:
            return False
        extent = max(extent, stride * size) if size > 1 else extent
    return True


def _rows_span_batch(*tensors: torch.Tensor) -> bool:
    """Whether each tensor's batch stride is ``seq`` rows (see
    [`plan`][dilated.kernels.strided_plan.plan])."""
    return all(t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1) for t in tensors)


def _expanded(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.repeat_interleave(h // x.shape[2], dim=2)


def _folded(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    b, n, h, d = dx.shape
    return dx.view(b, n, hkv, h // hkv, d).sum(3, dtype=torch.float32).to(dx.dtype)


def prepare_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: StridedCall
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``k``, ``v`` as the pieces read them, and their group (0: one per query head)."""
    h, hkv = q.shape[2], k.shape[2]
    layout = kv_layout(h, hkv, call.rs)
    if layout == "expand":
        return _expanded(k, h), _expanded(v, h), 0
    return k, v, (0 if layout == "mha" else h // hkv)


def sequences(call: StridedCall, n: int) -> list[slice]:
    """The rows of each sequence the call attends alone: all of them, or each non-empty
    sequence of a packed batch."""
    return sequence_slices(call.bounds) if call.bounds else [slice(0, n)] if n else []


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    call: StridedCall,
    seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of [`readable`][dilated.kernels.strided_run.readable] ``q``
    ``(batch, seq, heads, head_dim)``, ``k``/``v``
    ``(batch, seq, kv_heads, head_dim)`` and ``mask`` (bool ``(batch, seq)``, True = a key
    that may be attended, or None): ``out`` in the dtype of ``q``, ``lse`` float32
    ``(batch, heads, seq)``. ``seed``: the call's dropout seed (None without dropout)."""
    b, n, h, _ = q.shape
    k, v, group = prepare_kv(q, k, v, call)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    span = _rows_span_batch(q, k, v, out)
    index = 0
    # A packed sequence's rows are a view of the batch of one, written in place: one output,
    # no per-sequence op and no concatenation.
    for rows in sequences(call, n):
        index = _forward_rows(
            q[:, rows], k[:, rows], v[:, rows], None if mask is None else mask[:, rows],
            out[:, rows], lse[:, :, rows], call, group, span, seed, index,
        )  # fmt: skip
    return out, lse


def _chunk_plans(
    q: torch.Tensor, call: StridedCall, group: int, masked: bool, span: bool
) -> Iterator[tuple[int, int, tuple[DenseCall, ...], int]]:
    """``(t0, t1, calls, rmax)`` of each chunk of the sequence ``q`` ``(batch, seq, heads,
    head_dim)``: its rows, its engine calls and the phases per branch of the merge table."""
    b, n, h, d = q.shape
    rmax = max(min(r, h) for r in call.rs)
    for t0, t1 in chunks(b, n, h, d, call.ws):
        yield t0, t1, plan(b, n, h, call.ws, call.rs, t0, t1, group, masked, span), rmax


def _forward_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: StridedCall,
    group: int,
    span: bool,
    seed: int | None,
    index: int,
) -> int:
    """Write ``out`` and ``lse`` of one sequence; returns the next dropout-seed index."""
    b, h = q.shape[0], q.shape[2]
    ws, rs = call.ws, call.rs
    for t0, t1, pieces, rmax in _chunk_plans(q, call, group, mask is not None, span):
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
        merge_pieces(table, out, lse, ws, rs, rmax, rows=(t0, t1))
    return index


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    call: StridedCall,
    seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the call given its merged ``out`` and float32 ``lse`` (which may
    include keys of other parts: see
    [`subproblem_attention_backward`][dilated.kernels.subproblem.subproblem_attention_backward]);
    inputs as in [`forward`][dilated.kernels.strided_run.forward]."""
    hkv = k.shape[2]
    ke, ve, group = prepare_kv(q, k, v, call)
    do = grad_out.to(q.dtype)
    if do.stride() != out.stride():
        # dO in O's layout: each call then reads both through the same view (cuDNN 9.5+ has
        # assumed equal strides for the two).
        do = torch.empty_like(out).copy_(do)
    do = readable(do)
    # zeros: rows of a packed batch's empty sequences (none otherwise) are never written.
    make = torch.zeros_like if call.bounds else torch.empty_like
    grads = (make(q), make(ke), make(ve))
    span = _rows_span_batch(q, ke, ve, out, do, *grads)
    index = 0
    for rows in sequences(call, q.shape[1]):
        index = _backward_rows(
            q[:, rows], ke[:, rows], ve[:, rows], None if mask is None else mask[:, rows],
            out[:, rows], lse[:, :, rows], do[:, rows], tuple(g[:, rows] for g in grads),
            call, group, span, seed, index,
        )  # fmt: skip
    dq, dk, dv = grads
    if dk.shape[2] != hkv:
        dk, dv = _folded(dk, hkv), _folded(dv, hkv)
    return dq, dk, dv


def _backward_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    grads: tuple[torch.Tensor, ...],
    call: StridedCall,
    group: int,
    span: bool,
    seed: int | None,
    index: int,
) -> int:
    """Write ``grads`` (dq, dk, dv) of one sequence; returns the next dropout-seed index."""
    b, h = q.shape[0], q.shape[2]
    ws, rs = call.ws, call.rs
    for t0, t1, pieces, rmax in _chunk_plans(q, call, group, mask is not None, span):
        results = []
        for pc in pieces:
            results.append(
                subproblem_attention_backward(
                    view(do, pc), view(q, pc), view(k, pc, h, group), view(v, pc, h, group),
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
            sum_pieces(table, grad, ws, rs, rmax, group if which else 0, rows=(t0, t1))
    return index
