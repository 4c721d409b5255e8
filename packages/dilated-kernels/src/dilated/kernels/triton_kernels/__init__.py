"""The project's Triton kernels (each module imports ``triton``, so each is imported lazily, at
its first use, by the code that launches it).

| module | kernels | used by |
|---|---|---|
| ``gather_kernels`` | LSE merge of a call's pieces, gradient sums | the strided sub-problem backend |
| ``merge_kernel`` | the online LSE merge into float32 accumulators; ``lse_weights`` | [`dilated.kernels.merge`][dilated.kernels.merge], the fused epilogues |
| ``accumulate_kernel`` | strided gradient adds, overlapping key windows | [`dilated.kernels.accumulate`][dilated.kernels.accumulate] |
| ``fused_attention`` | the fused dilated attention, forward and backward | the ``"triton"`` backend |
| ``block_rows_kernel`` | many short dense pieces in one launch | [`dilated.kernels.block_rows`][dilated.kernels.block_rows] |

None of them is a dense engine: those are in [`dilated.kernels.engines`][dilated.kernels.engines].
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["interpreter_lock", "interpreting"]


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: Held around every launch while the interpreter runs them (see ``interpreter_lock``).
#: Reentrant: a locked region may call a helper that takes it again.
_INTERPRETER_LOCK = threading.RLock()


def interpreter_lock() -> contextlib.AbstractContextManager[object]:
    """A context that serialises Triton launches under ``TRITON_INTERPRET=1``, else does nothing.

    The interpreter keeps the running launch's grid and state in module globals, so launches
    from several threads at once fail (``y >= grid_dim[1]``) or read each other's state;
    compiled launches on CUDA are thread-safe and take no lock. Every launch of this package
    runs inside it.
    """
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()
