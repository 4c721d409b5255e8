"""The shared sub-problem primitive: dense attention of a strided view, and its backward.

Every dilated computation in the project is a set of dense attention problems over strided
views of ``(batch, seq, heads, head_dim)`` tensors (one per branch, phase and run of segments),
merged by their log-sum-exp. This module computes one batch of such problems, returning the
float32 LSE, and the gradient of one of them given the FINAL merged output and LSE of its rows.
The ``"cudnn"`` backend, the ring and all-gather strategies of dilated-ring, the LongNet KV cache
and dilated-sparse all call it.

Engines: cuDNN's fused attention (through PyTorch's ``_scaled_dot_product_cudnn_attention``),
which reads strided views in place at full speed and returns the LSE, for CUDA float16/bfloat16
inputs with ``head_dim`` a multiple of 8 up to 256 on Hopper (128 before), grouped-query heads
read natively, a key mask passed as an additive bias and dropout drawn from a Philox stream
seeded with ``dropout_seed`` (so the backward replays it); otherwise the portable plain-PyTorch
fallback of dilated-core
([`dense_segment_attention`][dilated.core.reference.dense_segment_attention]), computed in
float32, which materialises the score matrix of the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dilated.core.reference import (
    compute_dtype,
    dense_segment_attention,
    dense_segment_attention_backward,
)
from dilated.kernels._capabilities import cuda_capability_major, has_cudnn_attention

__all__ = [
    "CUDNN_MASK_DROPOUT_HEAD_DIMS",
    "cudnn_extras_reason",
    "cudnn_supports",
    "has_cudnn_attention",
    "subproblem_attention",
    "subproblem_attention_backward",
]


def cudnn_max_head_dim(device_index: int) -> int:
    """The largest ``head_dim`` cuDNN attention takes on this CUDA device: 256 on Hopper and
    newer (forward and backward, checked on an H200 with cuDNN 9.19), 128 before."""
    return 256 if cuda_capability_major(device_index) >= 9 else 128


#: head_dim values with which cuDNN's bias (key mask) and dropout were verified on an H200.
#: cuDNN has crashed the host process with a bias at other sizes (a segfault seen with
#: head_dim 16), so those calls take the fallback.
CUDNN_MASK_DROPOUT_HEAD_DIMS = (64, 128, 256)


def cudnn_extras_reason(
    q: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float
) -> str | None:
    """Why cuDNN may not take this call's key mask or dropout (CUDA only), or None."""
    if key_mask is None and dropout_p == 0.0:
        return None  # the common call, asked once per sub-problem
    extras = [name for name, on in (("a key mask", key_mask is not None),
                                     ("dropout", dropout_p > 0.0)) if on]  # fmt: skip
    if q.is_cuda and extras and q.shape[-1] not in CUDNN_MASK_DROPOUT_HEAD_DIMS:
        return (
            f"{' and '.join(extras)} run on cuDNN only with head_dim in "
            f"{CUDNN_MASK_DROPOUT_HEAD_DIMS}, got {q.shape[-1]}"
        )
    return None


def cudnn_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> bool:
    """Whether [`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention] runs
    this call on cuDNN (else on the plain-PyTorch fallback).

    cuDNN takes grouped-query attention natively, a key mask as an additive bias and dropout
    from its own Philox stream (those two with ``head_dim`` in ``CUDNN_MASK_DROPOUT_HEAD_DIMS``).
    """
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[1] > 0
        and k.shape[1] > 0
        and q.shape[2] % k.shape[2] == 0
        # cuDNN's causal mask with unequal lengths is not top-left aligned everywhere.
        and (not is_causal or q.shape[1] == k.shape[1])
        and has_cudnn_attention()
        and q.shape[-1] <= cudnn_max_head_dim(q.device.index or 0)
        and cudnn_extras_reason(q, key_mask, dropout_p) is None
    )


def _key_bias(key_mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``key_mask`` ``(batch, rows_k)`` as cuDNN's additive bias ``(batch, heads, rows_q, rows_k)``.

    0 for allowed keys, ``-inf`` for the others, in the dtype of ``q`` (cuDNN reads the bias in
    the inputs' dtype). One ``(batch, rows_k)`` tensor broadcast over heads and queries, each
    batch row 16-byte aligned: cuDNN misreads other bias strides.
    """
    b, rows_q, heads, _ = q.shape
    rows_k = key_mask.shape[1]
    padded = -(-rows_k // 8) * 8
    bias = torch.zeros(b, padded, dtype=q.dtype, device=q.device)[:, :rows_k]
    bias.masked_fill_(~key_mask, float("-inf"))
    return bias[:, None, None, :].expand(b, heads, rows_q, rows_k)


@contextlib.contextmanager
def _cudnn_dropout_stream(device: torch.device, seed: int | None) -> Iterator[None]:
    """cuDNN draws dropout from the device's default generator: seed it with ``seed`` (offset 0)
    for this call and restore it after, so that the backward can replay ``(seed, 0)``."""
    if seed is None:
        yield
        return
    if torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "dropout_p > 0 on cuDNN cannot be captured in a CUDA graph (each call reseeds the "
            "generator); capture with dropout_p=0"
        )
    gen = torch.cuda.default_generators[device.index or 0]
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


def _philox(seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(seed, offset)`` device scalars cuDNN's backward replays a dropout mask from."""
    # Pinned and asynchronous: a pageable copy would wait for every queued kernel.
    pair = torch.tensor([seed & ((1 << 63) - 1), 0], dtype=torch.int64).pin_memory()
    on_device = pair.to(device, non_blocking=True)
    return on_device[0], on_device[1]


def _check_seed(dropout_p: float, dropout_seed: int | None) -> None:
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_seed is required with dropout_p > 0: the backward replays it")


def subproblem_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of a batch of sub-problems, with its float32 log-sum-exp.

    Args:
        q: ``(batch, rows_q, heads, head_dim)``, any strides with a unit stride on
            ``head_dim`` (a strided view of a ``(batch, seq, heads, head_dim)`` input is read in
            place).
        k: ``(batch, rows_k, kv_heads, head_dim)``, ``heads % kv_heads == 0``: query head ``j``
            reads key/value head ``j // (heads / kv_heads)``.
        v: shaped like ``k``.
        scale: softmax scale.
        is_causal: top-left aligned: query row ``i`` sees key rows ``j <= i``.
        key_mask: bool ``(batch, rows_k)``, True = key allowed, or None.
        dropout_p: dropout on the attention probabilities.
        dropout_seed: with ``dropout_p > 0``, the seed the dropout mask is drawn from (required:
            the backward pass draws the same mask from it).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, rows_q, heads, head_dim)`` in the dtype of ``q`` (0 for
        a row with no allowed key); ``lse`` ``(batch, heads, rows_q)`` float32 (float64 for
        float64 inputs; ``-inf`` there), taken before dropout so that partial results merge into
        one softmax.
    """
    _check_seed(dropout_p, dropout_seed)
    if cudnn_supports(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p):
        bias = None if key_mask is None else _key_bias(key_mask, q)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with _cudnn_dropout_stream(q.device, dropout_seed if dropout_p > 0.0 else None):
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, bias, True, dropout_p, is_causal, False, scale=scale
            )
        return res[0].transpose(1, 2), res[1].reshape(qt.shape[:-1])
    work = compute_dtype(q.dtype)
    out, lse = dense_segment_attention(
        q.to(work),
        k.to(work),
        v.to(work),
        key_mask,
        scale,
        is_causal,
        dropout_p,
        dropout_seed,
    )
    return out.to(q.dtype), lse.to(work)


def subproblem_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This sub-problem's share of the gradients, given the FINAL merged output and LSE.

    Parts merged by log-sum-exp (branches, ring steps, sparse blocks) form one softmax over the
    union of their keys, so each part's gradient is the ordinary attention backward evaluated
    with the merged ``O`` and ``L`` (``P = exp(S - L)``, ``dS = P (dP - rowsum(dO O))``); the
    parts' shares add up to the gradient of the whole.

    Args:
        grad_out: gradient of the final output rows, ``(batch, rows_q, heads, head_dim)``.
        q, k, v, scale, is_causal, key_mask, dropout_p, dropout_seed: as in the forward call
            ([`subproblem_attention`][dilated.kernels.subproblem.subproblem_attention]).
        out: the final merged output of these rows, ``(batch, rows_q, heads, head_dim)``.
        lse: the final merged LSE ``(batch, heads, rows_q)`` (``-inf`` for uncovered rows).

    Returns:
        ``(dq, dk, dv)``: ``dq`` ``(batch, rows_q, heads, head_dim)``, ``dk``/``dv``
        ``(batch, rows_k, kv_heads, head_dim)`` (grouped query heads summed into their key/value
        head), in the dtypes of ``q``, ``k``, ``v``.
    """
    _check_seed(dropout_p, dropout_seed)
    if cudnn_supports(q, k, is_causal=is_causal, key_mask=key_mask, dropout_p=dropout_p):
        bias = None
        lse = lse.float()
        if key_mask is not None:
            bias = _key_bias(key_mask, q)
            # A row that sees no key anywhere has L = -inf; P = exp(S - L) must be 0 there,
            # which L = +inf gives (cuDNN would compute -inf - (-inf) = NaN).
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        if dropout_p > 0.0 and dropout_seed is not None:
            seed, offset = _philox(dropout_seed, q.device)
        else:
            # No dropout: the philox seed/offset are never read.
            seed = offset = q.new_empty(0, dtype=torch.int64)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.to(q.dtype).transpose(1, 2), qt, kt, vt, out.to(q.dtype).transpose(1, 2),
            lse.contiguous().unsqueeze(-1), seed, offset, bias, None, None,
            qt.shape[2], kt.shape[2], dropout_p, is_causal, scale=scale,
        )  # fmt: skip
        dq, dk, dv = (g.transpose(1, 2) for g in grads[:3])
        return dq, dk, dv
    work = compute_dtype(q.dtype)
    dq, dk, dv = dense_segment_attention_backward(
        grad_out.to(work),
        q.to(work),
        k.to(work),
        v.to(work),
        out.to(work),
        lse,
        key_mask,
        scale,
        is_causal,
        dropout_p,
        dropout_seed,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
