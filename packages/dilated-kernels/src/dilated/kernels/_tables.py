"""Small host-built tables (kernel arguments) copied to the device without a host sync."""

from __future__ import annotations

import torch

__all__ = ["upload"]

#: Host tables read by captured CUDA graphs (a few hundred bytes per table captured).
_GRAPH_TABLES: list[torch.Tensor] = []


def upload(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` (a CPU tensor) on ``device``: through pinned memory and asynchronously on
    CUDA, since a pageable copy would wait for every queued kernel.

    Under CUDA-graph capture, the captured copy reads the host buffer again at every replay, so
    the buffer is kept alive for the life of the process. The copy on the device is then the
    graph's own: callers that cache it must not cache one made while
    ``torch.cuda.is_current_stream_capturing()``.
    """
    if device.type != "cuda":
        return table.to(device)
    pinned = table.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _GRAPH_TABLES.append(pinned)
    return pinned.to(device, non_blocking=True)
