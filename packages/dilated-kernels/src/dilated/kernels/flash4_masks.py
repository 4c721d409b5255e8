"""The element rule flash-attn-4 applies on the partial blocks of a block-sparse call.

A block-sparse call of flash-attn-4 lists, per block of rows, its *full* blocks (every pair
allowed: no mask at all) and its *partial* ones, on which a ``mask_mod`` decides each pair.
[`ElementMask`][dilated.kernels.flash4_masks.ElementMask] says what that rule checks;
[`mask_mod`][dilated.kernels.flash4_masks.mask_mod] compiles it to a CuTe DSL function (one per
distinct rule, cached: flash-attn-4 keys its compiled kernels by the function's source and
captured values). Importing this module does not import the CuTe DSL; ``mask_mod`` does\n(``dilated.kernels.flash4_cute_masks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dilated.core.caching import plan_cache

__all__ = ["KEEP_PER_BATCH", "KEEP_PER_HEAD", "ElementMask", "mask_mod"]

#: ``ElementMask.keep``: a key mask per call batch entry, aux tensor ``(batch, keys)``.
KEEP_PER_BATCH = 1
#: ``ElementMask.keep``: a key mask per batch entry and head, aux tensor ``(batch, heads, keys)``.
KEEP_PER_HEAD = 2


@dataclass(frozen=True)
class ElementMask:
    """What the ``mask_mod`` of a block-sparse call checks for query row ``i`` and key row ``j``
    of the call's sub-problem, on its partial blocks only.

    The aux tensors of the call are, in this order, the block table (when ``layout_block``) and
    the key mask (when ``keep``), both int32, 1 = allowed, and at least as long as the rounded
    rows the kernel reads (whole blocks of the call's tables).

    Attributes:
        causal: ``j <= i``.
        layout_block: > 0: ``table[i // layout_block, j // layout_block]`` is nonzero (a layout
            whose blocks do not align with the kernel's); 0: not checked.
        keep: 0: no key mask; ``KEEP_PER_BATCH``:
            ``keep[b, j]``; ``KEEP_PER_HEAD``:
            ``keep[b, h, j]`` (calls whose heads are phases at different rows).
    """

    causal: bool = False
    layout_block: int = 0
    keep: int = 0

    def __post_init__(self) -> None:
        if self.layout_block < 0:
            raise ValueError(f"layout_block must be >= 0, got {self.layout_block}")
        if self.keep not in (0, KEEP_PER_BATCH, KEEP_PER_HEAD):
            raise ValueError(
                f"keep must be 0, KEEP_PER_BATCH ({KEEP_PER_BATCH}) or KEEP_PER_HEAD "
                f"({KEEP_PER_HEAD}), got {self.keep}"
            )

    @property
    def checks_anything(self) -> bool:
        """Whether the rule can reject a pair (otherwise no ``mask_mod`` is needed)."""
        return self.causal or self.layout_block > 0 or self.keep > 0


@plan_cache("dilated.kernels.flash4_masks.mask_mod", maxsize=64, key="the ElementMask")
def mask_mod(mask: ElementMask) -> Callable[..., Any]:
    """The CuTe DSL ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)`` of
    ``mask`` (flash-attn-4's signature; the indices are int32 tensors of one element), built
    once per rule: flash-attn-4 hashes a new function object's source at every first use."""
    from dilated.kernels import flash4_cute_masks

    built: Callable[..., Any] = flash4_cute_masks.build(mask.causal, mask.layout_block, mask.keep)
    return built
