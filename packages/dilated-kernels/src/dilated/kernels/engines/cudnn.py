"""The ``"cudnn"`` engine: cuDNN's fused attention through PyTorch
(``aten._scaled_dot_product_cudnn_attention`` and its backward).

It reads strided views in place at full speed and returns the float32 LSE, for CUDA
float16/bfloat16 inputs with ``head_dim`` a multiple of 8 up to 256 on Hopper (128 before);
grouped-query heads are read natively, a key mask is passed as an additive bias and dropout is
drawn from a Philox stream seeded with ``dropout_seed`` (so the backward replays it).

cuDNN builds an execution plan the first time it sees a shape (tens of ms), so ``"auto"`` sends
a shape it has not seen to an engine without that cost where one takes the call (see
[`choose_engine`][dilated.kernels.engines.choose_engine]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dilated.kernels._capabilities import cuda_capability_major, has_cudnn_attention
from dilated.kernels.engines.spec import SubproblemSpec

__all__ = [
    "FALLBACK",
    "HEAVY_HOST_PATH",
    "MASK_DROPOUT_HEAD_DIMS",
    "NAME",
    "PLANS_PER_SHAPE",
    "available",
    "backward",
    "extras_reason",
    "forward",
    "max_head_dim",
    "unsupported_reason",
]

NAME = "cudnn"
PLANS_PER_SHAPE = True
FALLBACK = False
HEAVY_HOST_PATH = False

#: head_dim values with which cuDNN's bias (key mask) and dropout were verified on an H200.
#: cuDNN has crashed the host process with a bias at other sizes (a segfault seen with
#: head_dim 16), so those calls go to another engine.
MASK_DROPOUT_HEAD_DIMS = (64, 128, 256)


def max_head_dim(device_index: int) -> int:
    """The largest ``head_dim`` cuDNN attention takes on this CUDA device: 256 on Hopper and
    newer (forward and backward, checked on an H200 with cuDNN 9.19), 128 before."""
    return 256 if cuda_capability_major(device_index) >= 9 else 128


def available(device: torch.device) -> bool:
    """CUDA with a PyTorch build that has cuDNN's fused attention."""
    return device.type == "cuda" and has_cudnn_attention()


def extras_reason(head_dim: int, key_mask: bool, dropout: bool) -> str | None:
    """Why cuDNN may not take a key mask or dropout at this ``head_dim``, or None."""
    if not (key_mask or dropout) or head_dim in MASK_DROPOUT_HEAD_DIMS:
        return None
    extras = [name for name, on in (("a key mask", key_mask), ("dropout", dropout)) if on]
    return (
        f"{' and '.join(extras)} run on cuDNN only with head_dim in "
        f"{MASK_DROPOUT_HEAD_DIMS}, got {head_dim}"
    )


def unsupported_reason(spec: SubproblemSpec) -> str | None:
    """Why cuDNN cannot run a call of ``spec``, or None."""
    if spec.device_type != "cuda":
        return "cuDNN runs on CUDA only"
    if not has_cudnn_attention():
        return "this PyTorch build has no cuDNN attention"
    if spec.dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN attention takes float16/bfloat16, got {spec.dtype}"
    limit = max_head_dim(spec.device_index)
    if spec.head_dim % 8 or spec.head_dim > limit:
        return f"cuDNN takes head_dim a multiple of 8 up to {limit}, got {spec.head_dim}"
    if spec.empty:
        return "an empty sub-problem"
    if spec.is_causal and not spec.equal_rows:
        return "cuDNN's causal mask with unequal lengths is not top-left aligned everywhere"
    return extras_reason(spec.head_dim, spec.key_mask, spec.dropout)


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
def _dropout_stream(device: torch.device, seed: int | None) -> Iterator[None]:
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
    bias = None if key_mask is None else _key_bias(key_mask, q)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with _dropout_stream(q.device, dropout_seed if dropout_p > 0.0 else None):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, bias, True, dropout_p, is_causal, False, scale=scale
        )
    return res[0].transpose(1, 2), res[1].reshape(qt.shape[:-1])


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
