"""Backends of [`dilated.kernels.dilated_attention`][dilated.kernels.functional.dilated_attention], one module each.

Each backend module exposes ``NAME``, ``available(device) -> bool`` and
``forward(q, k, v, segment_lengths, dilation_rates, *, scale, is_causal, key_padding_mask,
dropout_p) -> (out, lse)`` on inputs already validated by
[`dilated.core.functional.prepare_call`][dilated.core.functional.prepare_call]; their
``key_padding_mask`` is the internal form it returns (bool, True = a key that may be attended),
not the public one (True = padding).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch

from dilated.kernels.backends import cudnn, flash, reference, sdpa
from dilated.kernels.backends import triton as triton_backend

__all__ = [
    "BACKEND_NAMES",
    "available_backends",
    "backend_forward",
    "choose_backend",
    "get_backend",
]

logger = logging.getLogger(__name__)

_MODULES = {m.NAME: m for m in (cudnn, triton_backend, flash, sdpa, reference)}

#: Every backend name ``dilated_attention(backend=...)`` accepts, ``"auto"`` included.
BACKEND_NAMES: tuple[str, ...] = ("auto", *_MODULES)


def get_backend(name: str):  # type: ignore[no-untyped-def]
    """The backend module called ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    return _MODULES[name]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable on ``device`` (default: CUDA when available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return [name for name, m in _MODULES.items() if m.available(dev)]


def choose_backend(
    q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, dropout_p: float
) -> str:
    """The backend ``"auto"`` runs for this call (logged at debug level).

    | device, call | backend |
    |---|---|
    | CUDA, float16/bfloat16, ``head_dim % 8 == 0``, ``head_dim <= 256`` (Hopper; 128 before), GQA, causal; a key padding mask or dropout with ``head_dim`` 64, 128 or 256 | ``"cudnn"``: the strided sub-problem backend, each sub-problem on the engine [`choose_engine`][dilated.kernels.engines.choose_engine] picks (flash-attn-4 when installed, else cuDNN, or PyTorch's flash kernels for a shape cuDNN has not planned) |
    | CUDA, other float16/bfloat16/float32 calls without dropout | ``"triton"``, with a one-time warning that this is a slower path |
    | CUDA, the rest (dropout in float32, float64) | ``"sdpa"`` |
    | CPU and other devices | ``"reference"`` |
    """
    if q.is_cuda:
        why_not_cudnn = cudnn.unsupported_reason(q, k, key_padding_mask, dropout_p, "auto")
        if why_not_cudnn is None:
            name = cudnn.NAME
        elif triton_backend.unsupported_reason(q, dropout_p) is None:
            name = triton_backend.NAME
            _warn_slow_path(why_not_cudnn)
        else:
            name = sdpa.NAME
    else:
        name = reference.NAME
    # Logging is a graph break under torch.compile; the choice is the same in eager mode.
    if not torch.compiler.is_compiling():
        logger.debug("dilated_attention backend='auto' chose %r on %s", name, q.device)
    return name


_AUTO_ENGINE_FORWARD = functools.partial(cudnn.forward, engine="auto")


def backend_forward(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], bool]:
    """The ``forward`` function that runs this call on ``backend`` (``"auto"``: the backend
    [`choose_backend`][dilated.kernels.backends.choose_backend] picks, its sub-problems on the
    engine chosen per call), and whether it takes a packed batch in one call
    (``sequence_bounds=``; the strided sub-problem backends do)."""
    name = choose_backend(q, k, key_padding_mask, dropout_p) if backend == "auto" else backend
    module = get_backend(name)
    packs = module in (cudnn, flash)
    if backend == "auto" and name == cudnn.NAME:
        return _AUTO_ENGINE_FORWARD, packs
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]] = module.forward
    return forward, packs


_warned: set[str] = set()


def _warn_slow_path(why_not_cudnn: str) -> None:
    """Say once per reason that the call left the cuDNN path, and why."""
    if why_not_cudnn in _warned or torch.compiler.is_compiling():
        return
    _warned.add(why_not_cudnn)
    warnings.warn(
        "dilated_attention backend='auto' runs this call on the fused Triton kernel, several "
        f"times slower than the cuDNN path, which cannot take it: {why_not_cudnn}",
        stacklevel=4,
    )
