"""Block-sparse calls of flash-attn-4: one kernel walks a block table, forward and backward.

A call computes attention of ``q`` ``(batch, rows, heads, head_dim)`` over ``k``/``v``
``(batch, rows_k, kv_heads, head_dim)`` (strided views read in place, grouped-query heads
natively) restricted to the blocks its [`BlockLists`][dilated.kernels.flash4_block_sparse.BlockLists]
name: the forward pass walks, per block of query rows, its key blocks; the backward pass, per
block of key rows, its query blocks. *Full* blocks run without any mask; *partial* ones apply
the call's [`ElementMask`][dilated.kernels.flash4_masks.ElementMask] as flash-attn-4's
``mask_mod``. Rows past the sequence ends are masked by the kernel itself, so a block cut by
the end is full when every pair inside the ends is allowed. The forward pass writes into given
``out``/``lse`` tensors; the backward pass into given ``dq``/``dk``/``dv``.

Only SM90 (Hopper) with ``head_dim <= 128`` is taken: there both passes use 128 x 128 blocks
(the backward requires its key block to equal its key tile, 128 for these head dims; the
forward's tiles are 128 x 128). Elsewhere [`unsupported_reason`][dilated.kernels.flash4_block_sparse.unsupported_reason]
says why, and the caller keeps its other path. Nothing here imports flash-attn-4 before a call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilated.kernels._capabilities import cuda_capability_major
from dilated.kernels.engines import flash4
from dilated.kernels.engines.spec import SubproblemSpec
from dilated.kernels.flash4_masks import ElementMask, mask_mod

__all__ = ["BLOCK", "BlockLists", "backward", "forward", "spec_reason", "unsupported_reason"]

#: Rows per block of the tables, query and key, that flash-attn-4 takes on SM90 with
#: ``head_dim <= 128`` in both passes.
BLOCK = (128, 128)


@dataclass(frozen=True)
class BlockLists:
    """One pass's block table in flash-attn-4's form (its ``BlockSparseTensorsTorch`` fields).

    For each ``(batch, head, row block)`` (forward: a block of query rows; backward: a block of
    key rows), the blocks of the other side it meets, ascending, in two lists: partial ones
    (``mask_*``) and full ones (``full_*``). All int32 on the call's device; batch and head
    dimensions may be 1 (broadcast to the call's), and the lists may be narrower than the
    number of blocks (only the first ``count`` entries are read).

    Attributes:
        mask_cnt, full_cnt: ``(batch | 1, heads | 1, row_blocks)``.
        mask_idx, full_idx: ``(batch | 1, heads | 1, row_blocks, width)``.
        block: ``(query rows, key rows)`` per block.
    """

    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    block: tuple[int, int] = BLOCK


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, *, dropout_p: float = 0.0, backward: bool = True
) -> str | None:
    """Why a block-sparse flash-attn-4 call on ``q``/``k`` (or its backward) cannot run, or None."""
    return spec_reason(
        SubproblemSpec.of(
            q, k, is_causal=False, key_mask=None, dropout_p=dropout_p, backward=backward
        )
    )


def spec_reason(spec: SubproblemSpec) -> str | None:
    """[`unsupported_reason`][dilated.kernels.flash4_block_sparse.unsupported_reason] of a
    call described by ``spec`` (the dense engine's reasons, then the block tables')."""
    reason = flash4.unsupported_reason(spec)
    if reason is not None:
        return reason
    major = cuda_capability_major(spec.device_index)
    if major != 9:
        return (
            f"its block tables are built for SM90's 128 x 128 sparse blocks (this GPU is "
            f"SM{major}x)"
        )
    if spec.head_dim > 128:
        return (
            f"flash-attn-4's SM90 sparse blocks are 128 x 128 up to head_dim 128, got "
            f"{spec.head_dim}"
        )
    return None


def _sparse_tensors(tables: BlockLists) -> object:
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(
        mask_block_cnt=tables.mask_cnt,
        mask_block_idx=tables.mask_idx,
        full_block_cnt=tables.full_cnt,
        full_block_idx=tables.full_idx,
        block_size=tables.block,
    )


def _mask_arguments(
    mask: ElementMask, aux: Sequence[torch.Tensor]
) -> tuple[object | None, list[torch.Tensor] | None]:
    want = (mask.layout_block > 0) + (mask.keep > 0)
    if len(aux) != want:
        raise ValueError(f"aux must hold {want} tensors for {mask}, got {len(aux)}")
    return (mask_mod(mask) if mask.checks_anything else None), (list(aux) or None)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    tables: BlockLists,
    mask: ElementMask,
    aux: Sequence[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Block-sparse attention into ``out`` ``(batch, rows, heads, head_dim)`` (dtype of ``q``,
    unit ``head_dim`` stride, 16-byte aligned strides) and ``lse`` float32 ``(batch, heads,
    rows)`` (unit ``rows`` stride). Rows without any allowed key get ``out = 0``, ``lse = -inf``.

    Args:
        q: ``(batch, rows, heads, head_dim)`` float16/bfloat16, any 16-byte aligned strides.
        k, v: ``(batch, rows_k, kv_heads, head_dim)``.
        scale: softmax scale.
        tables: the forward lists (per query block).
        mask: the rule of the partial blocks.
        aux: the aux tensors ``mask`` reads (see
            [`ElementMask`][dilated.kernels.flash4_masks.ElementMask]).
        out, lse: written in place.
    """
    mod, aux_list = _mask_arguments(mask, aux)
    flash4.call_interface(
        "_flash_attn_fwd", q, k, v, softmax_scale=scale, causal=False, mask_mod=mod,
        block_sparse_tensors=_sparse_tensors(tables), return_lse=True, out=out, lse=lse,
        aux_tensors=aux_list,
    )  # fmt: skip


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    tables: BlockLists,
    mask: ElementMask,
    aux: Sequence[torch.Tensor],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """The gradients of a block-sparse call into ``dq`` (shaped like ``q``), ``dk``, ``dv``
    (shaped like ``k``), in the dtype of ``q``, given the FINAL ``out`` ``(batch, rows, heads,
    head_dim)`` and float32 ``lse`` ``(batch, heads, rows)`` of these rows (which may include
    keys of other calls: the gradient of this call's part of one softmax).

    ``tables`` are the backward lists (per key block); the rest as in
    [`forward`][dilated.kernels.flash4_block_sparse.forward].
    """
    mod, aux_list = _mask_arguments(mask, aux)
    flash4.call_interface(
        "_flash_attn_bwd", q, k, v, out, grad_out, lse, softmax_scale=scale, causal=False,
        mask_mod=mod, block_sparse_tensors=_sparse_tensors(tables), aux_tensors=aux_list,
        dq=dq, dk=dk, dv=dv,
    )  # fmt: skip
