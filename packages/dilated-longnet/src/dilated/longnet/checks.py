"""The input checks of the LongNet layers and models (the rules of the attention itself are
dilated-core's, in [`dilated.core.checks`][dilated.core.checks]).

Each raises `ValueError` (or [`ArgumentTypeError`][dilated.core.checks.ArgumentTypeError] for a
wrong kind of object) naming the argument and the rule it breaks.
"""

from __future__ import annotations

from typing import Any

import torch

from dilated.core.checks import ArgumentTypeError
from dilated.longnet.kv_cache import KVCache

__all__ = ["check_cache", "check_layer_input", "check_no_attn_mask", "check_token_ids"]


def check_layer_input(
    name: str, x: object, d_model: int, batch: tuple[str, int] | None = None
) -> None:
    """``x`` must be a ``(batch, seq, d_model)`` tensor; ``batch = (other_name, size)``: of the
    same batch as the tensor ``other_name``."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name} must have shape (batch, seq, d_model={d_model}), got {tuple(x.shape)}"
        )
    if batch is not None and x.shape[0] != batch[1]:
        raise ValueError(
            f"{name} has batch {x.shape[0]} but {batch[0]} has batch {batch[1]}: the encoder "
            "and decoder sides must hold the same sequences (one memory per target)"
        )


def check_no_attn_mask(mask: Any, name: str, is_causal: bool, flag: str, not_given: Any) -> None:
    """``mask`` (the ``src_mask``/``tgt_mask``/``memory_mask`` of torch's layers) must be None,
    ``not_given``, or come with ``flag=True`` (the causal mask torch passes along with it)."""
    if mask is None or mask is not_given:
        return
    if not is_causal:
        raise ValueError(
            f"{name} is not supported: dilated attention takes {flag}=True and key padding masks, "
            f"not arbitrary masks (a causal {name} may be given together with {flag}=True)"
        )


def check_token_ids(input_ids: object, num_tokens: int, check_range: bool) -> None:
    """``input_ids`` must be an int32/int64 ``(batch, seq >= 1)`` tensor; with ``check_range``
    (a device sync on CUDA), every id in ``[0, num_tokens)``."""
    if not isinstance(input_ids, torch.Tensor):
        raise ArgumentTypeError(
            f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per sequence (seq >= 1)")
    if not check_range or input_ids.device.type == "meta" or torch.compiler.is_compiling():
        return
    bad = (input_ids < 0) | (input_ids >= num_tokens)
    if bool(bad.any()):
        first, count = input_ids[bad][0].item(), int(bad.sum())
        more = f" ({count - 1} more ids out of range)" if count > 1 else ""
        raise ValueError(
            f"input_ids must lie in [0, num_tokens={num_tokens}), got id {first}{more}"
        )


def check_cache(cache: object, layers: int, batch: int) -> KVCache:
    """``cache`` must be a [`KVCache`][dilated.longnet.kv_cache.KVCache] of ``layers`` layers
    made for ``batch`` sequences (``batch`` is the batch of ``input_ids``); returns it."""
    if not isinstance(cache, KVCache):
        raise ArgumentTypeError(
            f"cache must be a KVCache from new_cache(), got {type(cache).__name__}"
        )
    if len(cache.layers) != layers:
        raise ValueError(
            f"cache has {len(cache.layers)} layer(s) but the model has {layers}: "
            "create it with this model's new_cache()"
        )
    cached = cache.layers[0].k.shape[0]
    if cached != batch:
        raise ValueError(
            f"cache was created for batch {cached}, got input_ids of batch {batch}; "
            "create it with new_cache(batch=...) of this batch size"
        )
    return cache
