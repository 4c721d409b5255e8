"""Which path a block-sparse call takes: ``"flash4"`` (flash-attn-4's block sparsity) or
``"tiles"`` (dense calls of the shared sub-problem primitive).

| path | runs | when ``"auto"`` takes it |
|---|---|---|
| ``"flash4"`` ([`dilated.sparse.flash4_path`][dilated.sparse.flash4_path]) | one flash-attn-4 call per run over its block tables, forward and backward; one merge | flash-attn-4 installed, an SM90 GPU, float16/bfloat16, ``head_dim`` a multiple of 8 up to 128, no dropout |
| ``"tiles"`` ([`dilated.sparse.engine`][dilated.sparse.engine]) | the layout's dense rectangles as calls of cuDNN (or the reference engine), merged call by call | everything else (CPU, float32/float64, dropout, other GPUs, larger ``head_dim``) |

Both compute the same function (the judge of [`dilated.core.testing`][dilated.core.testing]
checks each). The setting ``sparse_flash4`` of [`dilated.core.settings`][dilated.core.settings]
(``DILATED_SPARSE_FLASH4``, or ``use_settings(sparse_flash4=...)``) overrides the choice.
"""

from __future__ import annotations

import warnings

import torch

from dilated.core.settings import get_settings
from dilated.kernels import flash4_block_sparse as fa4
from dilated.kernels._capabilities import HAS_FLASH_ATTN_4

__all__ = ["PATHS", "choose_path", "flash4_reason"]

#: The two paths.
PATHS = ("flash4", "tiles")

_warned: set[str] = set()


def flash4_reason(q: torch.Tensor, k: torch.Tensor, *, dropout_p: float = 0.0) -> str | None:
    """Why the flash4 path cannot run a call on ``q`` ``(batch, seq, heads, head_dim)`` and
    ``k`` (forward and backward alike), or None when it can."""
    if q.shape[0] == 0 or q.shape[1] == 0:
        return "an empty batch or sequence"
    return fa4.unsupported_reason(q, k, dropout_p=dropout_p, backward=True)


def choose_path(q: torch.Tensor, k: torch.Tensor, *, dropout_p: float = 0.0) -> str:
    """``"flash4"`` or ``"tiles"``: the path a call on ``q``/``k`` takes under the setting
    ``sparse_flash4`` (None: ``"flash4"`` wherever it runs the call, else ``"tiles"``, with a
    warning once per reason when flash-attn-4 is installed and the call is on CUDA).

    Raises:
        ValueError: ``sparse_flash4`` is True and the flash4 path cannot run the call (the
            message says why).
    """
    wanted = get_settings().sparse_flash4
    if wanted is False:
        return "tiles"
    reason = flash4_reason(q, k, dropout_p=dropout_p)
    if reason is None:
        return "flash4"
    if wanted:
        raise ValueError(
            f"the setting sparse_flash4=True cannot run this call on flash-attn-4: {reason}; "
            "leave it None (auto) to use the tiles path"
        )
    if HAS_FLASH_ATTN_4 and q.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"block-sparse attention runs on the 'tiles' path instead of 'flash4': {reason}",
            stacklevel=4,
        )
    return "tiles"
