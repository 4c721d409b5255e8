"""Which path a block-sparse call takes: ``"flash4"`` (flash-attn-4's block sparsity) or
``"tiles"`` (dense calls of the shared sub-problem primitive).

| path | runs | when ``"auto"`` takes it |
|---|---|---|
| ``"flash4"`` ([`dilated.sparse.flash4_path`][dilated.sparse.flash4_path]) | one flash-attn-4 call per run over its block tables, forward and backward; one merge | flash-attn-4 installed, an SM90 GPU, float16/bfloat16, ``head_dim`` a multiple of 8 up to 128, no dropout |
| ``"tiles"`` ([`dilated.sparse.engine`][dilated.sparse.engine]) | the layout's dense rectangles as calls of cuDNN (or the reference engine), merged call by call | everything else (CPU, float32/float64, dropout, other GPUs, larger ``head_dim``) |

Both compute the same function (the judge of [`dilated.core.testing`][dilated.core.testing]
checks each). [`PATH`][dilated.sparse.paths.PATH] overrides the choice for the process.
"""

from __future__ import annotations

import warnings

import torch

from dilated.kernels import flash4_block_sparse as fa4
from dilated.kernels._capabilities import HAS_FLASH_ATTN_4

__all__ = ["PATH", "PATHS", "choose_path", "flash4_reason"]

#: Every value [`PATH`][dilated.sparse.paths.PATH] takes.
PATHS = ("auto", "flash4", "tiles")

#: The path of every block-sparse call of this process: ``"auto"`` (default: ``"flash4"``
#: wherever it runs the call, else ``"tiles"``, with a warning once per reason when
#: flash-attn-4 is installed and the call is on CUDA), ``"flash4"`` (a call it cannot run
#: raises ``ValueError`` saying why) or ``"tiles"``.
PATH = "auto"

_warned: set[str] = set()


def flash4_reason(q: torch.Tensor, k: torch.Tensor, *, dropout_p: float = 0.0) -> str | None:
    """Why the flash4 path cannot run a call on ``q`` ``(batch, seq, heads, head_dim)`` and
    ``k`` (forward and backward alike), or None when it can."""
    if q.shape[0] == 0 or q.shape[1] == 0:
        return "an empty batch or sequence"
    return fa4.unsupported_reason(q, k, dropout_p=dropout_p, backward=True)


def choose_path(q: torch.Tensor, k: torch.Tensor, *, dropout_p: float = 0.0) -> str:
    """``"flash4"`` or ``"tiles"``: the path a call on ``q``/``k`` takes under
    [`PATH`][dilated.sparse.paths.PATH].

    Raises:
        ValueError: ``PATH`` is not one of [`PATHS`][dilated.sparse.paths.PATHS], or it is
            ``"flash4"`` and the flash4 path cannot run the call (the message says why).
    """
    if PATH not in PATHS:
        raise ValueError(f"dilated.sparse.paths.PATH must be one of {PATHS}, got {PATH!r}")
    if PATH == "tiles":
        return "tiles"
    reason = flash4_reason(q, k, dropout_p=dropout_p)
    if reason is None:
        return "flash4"
    if PATH == "flash4":
        raise ValueError(
            f"dilated.sparse.paths.PATH='flash4' cannot run this call: {reason}; "
            "set PATH='auto' to use the tiles path"
        )
    if HAS_FLASH_ATTN_4 and q.is_cuda and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"block-sparse attention runs on the 'tiles' path instead of 'flash4': {reason}",
            stacklevel=4,
        )
    return "tiles"
