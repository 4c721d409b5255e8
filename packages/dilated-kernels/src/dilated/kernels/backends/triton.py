"""The ``"triton"`` backend: fused dilated attention, forward and backward (see ``dilated.kernels.triton_kernels.fused_attention``).

Supports causal, key padding mask, grouped-query attention, head_dim up to 128 and sequence
lengths that are not multiples of the segments. float16/bfloat16 inputs run their matmuls in
their dtype with float32 accumulation; float32 inputs run in full float32 (``input_precision="ieee"``, slower than
16-bit). Dropout is not supported: pass ``backend="sdpa"`` or ``"reference"``.
Without a GPU it runs under ``TRITON_INTERPRET=1`` (slow; for tests), in float16 and float32 only:
the interpreter's bfloat16 ``tl.dot`` is wrong, so bfloat16 calls are refused there.

Launches respect CUDA's grid limits (axes y and z at most 65535): a branch with more segments,
or a call with more ``batch * heads``, is split into several launches over chunks of them. A
segment longer than the sequence is run as the one segment it is (the same result), so huge
segment lengths cost nothing.

Its gradients are first derivatives only: under ``create_graph=True`` (a gradient penalty) they
carry a backward that raises ``RuntimeError``, and ``torch.func.vmap`` / ``torch.func.grad``
raise ``ValueError``; each message names ``backend='reference'`` and ``'sdpa'``, which support
them. Under the interpreter every launch holds one process-wide lock, so calls from several
threads are safe there (and run one launch at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.gradients import first_derivative_only
from dilated.kernels._capabilities import HAS_TRITON
from dilated.kernels.triton_kernels import interpreter_lock, interpreting

__all__ = [
    "NAME",
    "available",
    "backward",
    "dot_precision",
    "forward",
    "forward_blocks",
    "interpreter_lock",
    "interpreting",
    "launch_grids",
    "unsupported_reason",
]

NAME = "triton"
#: How errors name this backend.
NAME_ARG = f"backend={NAME!r}"
#: The backends named when this one refuses a second derivative or a ``torch.func``
#: transform: they are built from PyTorch ops, which autograd and the transforms go through.
ALTERNATIVES = "backend='reference' or 'sdpa'"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: CUDA's bound on grid axes y and z (axis x allows ``2**31 - 1``).
GRID_YZ_LIMIT = 65535
_GRID_X_LIMIT = 2**31 - 1
#: Positions are int32 in the kernels (element offsets are int64).
_MAX_SEQ = 2**31 - 1


def available(device: torch.device) -> bool:
    """Whether triton is installed and ``device`` is CUDA (or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def unsupported_reason(q: torch.Tensor, dropout_p: float) -> str | None:
    """Why this backend cannot take the call, or None when it can."""
    if dropout_p > 0.0:
        return "the fused kernel has no dropout; use backend='sdpa' or 'reference'"
    if not available(q.device):
        return f"it needs triton and a CUDA device (got {q.device.type})"
    if q.dtype not in _DTYPES:
        return f"it takes float16/bfloat16/float32, got {q.dtype}"
    if q.dtype == torch.bfloat16 and interpreting():
        return (
            "the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 tl.dot wrongly; "
            "use float16 or float32 there, or backend='reference'"
        )
    if q.shape[-1] > 128:
        return f"head_dim must be at most 128, got {q.shape[-1]}"
    if q.shape[1] > _MAX_SEQ:
        return f"seq must be below 2**31 (int32 positions), got {q.shape[1]}"
    return None


def dot_precision(q: torch.Tensor) -> str:
    """``tl.dot`` precision for inputs like ``q``."""
    # float32 inputs keep float32 products (the 1e-4 bound of the docs' Concepts page rules out tf32).
    return "ieee" if q.dtype == torch.float32 else "tf32"


def forward_blocks(d: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)`` of the forward kernels for ``head_dim`` ``d``."""
    block_d = max(16, 1 << (d - 1).bit_length())
    if interpreting():
        return 16, 16, block_d
    return (128, 64, block_d) if d <= 64 else (64, 64, block_d)


def _launch_options(d: int) -> dict[str, int]:
    # Backward kernels only: on an H100 these settings sped the backward up, but slowed the
    # forward (43.7 vs 25.9 ms at 256K tokens), which keeps Triton's defaults.
    if interpreting():
        return {}
    return {"num_warps": 8 if d > 64 else 4, "num_stages": 3}


def effective_segment(n: int, w: int, r: int) -> int:
    """The segment length that the kernels run for branch ``(w, r)`` on ``n`` positions.

    A segment at least as long as the sequence is one segment; the smallest multiple of ``r``
    that covers the sequence gives the same rows for every phase, so ``w`` is capped there
    (a segment of ``2**40`` would otherwise size the grid and the key loop by ``w / r``).
    """
    return min(w, r * triton_cdiv(n, r))


def _launch_geometry(n: int, w: int, r: int, block: int) -> tuple[int, int, int]:
    rows = w // r
    return rows, triton_cdiv(rows, block), triton_cdiv(n, w)


def launch_grids(
    blocks: int, segments: int, batch_heads: int
) -> list[tuple[tuple[int, int, int], int, int]]:
    """The launches of one kernel over ``(blocks, segments, batch_heads)`` programs.

    Returns ``(grid, seg0, bh0)`` per launch: axis 1 covers segments ``seg0..``, axis 2 the
    ``batch * head`` indices ``bh0..``, each at most ``GRID_YZ_LIMIT`` long. One launch when
    both fit (every realistic call).

    Raises:
        ValueError: more row blocks than CUDA's axis x allows (not reachable below 2**31 rows).
    """
    if blocks > _GRID_X_LIMIT:
        raise ValueError(f"{NAME_ARG}: {blocks} row blocks exceed CUDA's grid limit")
    lim = GRID_YZ_LIMIT
    return [
        ((blocks, min(lim, segments - s0), min(lim, batch_heads - h0)), s0, h0)
        for s0 in range(0, segments, lim)
        for h0 in range(0, batch_heads, lim)
    ]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_storage(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor has memory that a kernel can read.

    Under ``torch.func.grad`` (and ``jacrev``, ``hessian``...) the backward receives the
    transform's wrapper tensors, which have no storage: the launch would fail deep inside Triton.
    """
    if torch.compiler.is_compiling():
        return  # traced tensors are fake tensors, which have storage
    for t in tensors:
        try:
            t.untyped_storage()
        except (NotImplementedError, RuntimeError):
            raise ValueError(
                f"{NAME_ARG} is not supported under torch.func.grad or the other torch.func "
                f"transforms (its fused kernels read the tensors' memory, which the transforms' "
                f"wrapper tensors do not have); use {ALTERNATIVES}, which support them"
            ) from None


class _DilatedAttentionFn(torch.autograd.Function):
    # forward without ctx plus setup_context: the form that torch.func transforms require
    # before they reach vmap() or backward(), whose refusals name the backend.
    @staticmethod
    def forward(  # type: ignore[override]
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        ws: tuple[int, ...],
        rs: tuple[int, ...],
        scale: float,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from dilated.kernels.triton_kernels.fused_attention import branch_forward

        b, n, h, d = q.shape
        acc = torch.zeros(b, n, h, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, n), float("-inf"), dtype=torch.float32, device=q.device)
        bm, bn, bd = forward_blocks(d)
        mask_arg = q if mask is None else mask
        for w_given, r in zip(ws, rs):
            w = effective_segment(n, w_given, r)
            rows, nbm, nseg = _launch_geometry(n, w, r, bm)
            for grid, seg0, bh0 in launch_grids(nbm, nseg, b * h):
                with interpreter_lock():
                    branch_forward[grid](
                        q,
                        k,
                        v,
                        mask_arg,
                        acc,
                        lse,
                        q.stride(0),
                        q.stride(1),
                        q.stride(2),
                        k.stride(0),
                        k.stride(1),
                        k.stride(2),
                        acc.stride(0),
                        acc.stride(1),
                        acc.stride(2),
                        lse.stride(0),
                        lse.stride(1),
                        n,
                        h,
                        h // k.shape[2],
                        w,
                        r,
                        rows,
                        scale,
                        seg0,
                        bh0,
                        IS_CAUSAL=is_causal,
                        HAS_MASK=mask is not None,
                        DOT_PREC=dot_precision(q),
                        D=d,
                        BLOCK_D=bd,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                    )
        return acc.to(q.dtype), lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        q, k, v, mask, ws, rs, scale, is_causal = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.config = (ws, rs, scale, is_causal)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, mask, out, lse = ctx.saved_tensors
        ws, rs, scale, is_causal = ctx.config
        _check_storage(q, grad_out)
        with torch.no_grad():
            grads = backward(q, k, v, mask, out, lse, grad_out, grad_lse, ws, rs, scale, is_causal)
        # The kernels' gradients have no history: refuse a second derivative instead of
        # letting create_graph=True treat them as constants.
        dq, dk, dv = first_derivative_only(
            NAME_ARG, f"{ALTERNATIVES} (differentiable twice)", grads
        )
        return dq, dk, dv, None, None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *args: Any) -> Any:
        raise ValueError(
            f"{NAME_ARG} is not supported under torch.func.vmap (its fused kernels take one "
            f"batch dimension); use {ALTERNATIVES}, which run under vmap"
        )


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    ws: Sequence[int],
    rs: Sequence[int],
    scale: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of dilated attention from the merged ``out`` and ``lse``.

    Args:
        q, k, v: contiguous ``(batch, seq, heads | kv_heads, head_dim)`` inputs of the forward.
        mask: int8 key mask ``(batch, seq)`` in the internal form (1 = a key that may be attended) or None.
        out: the merged output ``(batch, seq, heads, head_dim)``.
        lse: the merged float32 LSE ``(batch, heads, seq)``.
        grad_out: gradient of ``out``; ``grad_lse``: gradient of ``lse`` or None.
        ws, rs, scale, is_causal: the call's branches and options.

    Returns:
        Gradients in the dtypes of ``q``, ``k`` and ``v``.
    """
    from dilated.kernels.triton_kernels.fused_attention import branch_backward, branch_backward_dq

    b, n, h, d = q.shape
    do = grad_out.to(q.dtype).contiguous()
    # dS = P * (dP - Delta) with Delta = rowsum(dO * O) - dL: the last term carries the
    # gradient of the returned LSE (d L / d S = P).
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if grad_lse is not None:
        delta = delta - torch.nan_to_num(grad_lse.float(), nan=0.0, posinf=0.0, neginf=0.0)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    bm, bn, bd = forward_blocks(d)
    mask_arg = q if mask is None else mask
    for w_given, r in zip(ws, rs):
        w = effective_segment(n, w_given, r)
        rows, nbn, nseg = _launch_geometry(n, w, r, bn)
        _, nbm, _ = _launch_geometry(n, w, r, bm)
        shape = (
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            lse.stride(0), lse.stride(1), n, h, h // k.shape[2], w, r, rows, scale,
        )  # fmt: skip
        options = {
            "IS_CAUSAL": is_causal, "HAS_MASK": mask is not None, "DOT_PREC": dot_precision(q),
            "D": d, "BLOCK_D": bd, "BLOCK_M": bm, "BLOCK_N": bn, **_launch_options(d),
        }  # fmt: skip
        for grid, seg0, bh0 in launch_grids(nbm, nseg, b * h):
            with interpreter_lock():
                branch_backward_dq[grid](
                    q, k, v, mask_arg, do, lse, delta, dq, *shape, seg0, bh0, **options
                )
        for grid, seg0, bh0 in launch_grids(nbn, nseg, b * h):
            with interpreter_lock():
                branch_backward[grid](
                    q, k, v, mask_arg, do, lse, delta, dk, dv, *shape, seg0, bh0, **options
                )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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

    Raises:
        ValueError: dropout (naming the backends that have it), no GPU, or unsupported dtype;
            a call under ``torch.func.vmap`` or ``torch.func.grad`` (naming the backends that
            run there).
    """
    reason = unsupported_reason(q, dropout_p)
    if reason is not None:
        raise ValueError(f"{NAME_ARG} cannot run this call: {reason}")
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    out, lse = _DilatedAttentionFn.apply(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        mask,
        tuple(segment_lengths),
        tuple(dilation_rates),
        scale,
        is_causal,
    )
    return out, lse
