# mypy: ignore-errors
"""The CuTe DSL body of [`mask_mod`][dilated.kernels.flash4_masks.mask_mod] (imports the CuTe
DSL, which flash-attn-4 installs: import it only to call flash-attn-4).

Written as flash-attn-4's own mask functions are: module-level imports, the rule's constants
captured by the closure (flash-attn-4 hashes the source and the captured values), ``const_expr``
branches resolved while tracing, int32 tensors of one element for the indices.
"""

from __future__ import annotations

from typing import Any

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils

__all__ = ["build"]


def build(causal: bool, layout_block: int, keep: int) -> Any:
    """``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)`` of the rule
    [`ElementMask(causal, layout_block, keep)`][dilated.kernels.flash4_masks.ElementMask]."""
    keep_at = 1 if layout_block > 0 else 0

    @cute.jit
    def dilated_sparse_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        one = utils.scalar_to_ssa(1, cutlass.Int32)
        # kv_idx >= 0 always holds: the neutral start of the conjunction.
        ok = n_idx >= utils.scalar_to_ssa(0, cutlass.Int32)
        if cutlass.const_expr(causal):
            ok = ok & (n_idx <= m_idx)
        if cutlass.const_expr(layout_block > 0):
            size = utils.scalar_to_ssa(layout_block, cutlass.Int32)
            q_block = m_idx // size
            k_block = n_idx // size
            allowed = utils.scalar_to_ssa(aux_tensors[0][q_block[0], k_block[0]], cutlass.Int32)
            ok = ok & (allowed >= one)
        if cutlass.const_expr(keep == 1):
            kept = utils.scalar_to_ssa(aux_tensors[keep_at][batch[0], n_idx[0]], cutlass.Int32)
            ok = ok & (kept >= one)
        if cutlass.const_expr(keep == 2):
            kept = utils.scalar_to_ssa(
                aux_tensors[keep_at][batch[0], head[0], n_idx[0]], cutlass.Int32
            )
            ok = ok & (kept >= one)
        return ok

    return dilated_sparse_mask
