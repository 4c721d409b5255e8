"""The mask builder of the Hugging Face attention ``"dilated"``, and the map of a static cache's slots.

transformers asks the builder registered with ``AttentionMaskInterface`` for the mask of every
forward pass and hands what it returns to each attention layer. Dilated attention needs no
quadratic mask: the builder hands over

- with a cache whose keys end at the last query (``DynamicCache``, or none): the 2D
  ``key_padding_mask``, PyTorch's convention (True = padding), or None when nothing is padded;
- with a static cache (``StaticCache``, ``cache_implementation="static"``: preallocated keys, only
  the first ones written): a **slot map**, int8 ``(batch, 1, 1, max_cache_len)``, ``0`` for a slot
  not written yet, ``1`` for a padding token, ``2`` for a token. The written slots are a prefix,
  so the attention function finds the query's position on the device (a decoding step needs no
  host synchronisation, and compiles whole), and a 4D mask is what transformers passes through
  unchanged when ``generate`` builds the masks of a static cache ahead of the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import causal_mask_function

__all__ = [
    "ATTENTION_NAME",
    "SLOT_PADDING",
    "SLOT_TOKEN",
    "dilated_attention_mask",
    "read_slot_map",
]

#: The ``attn_implementation`` name of dilated attention.
ATTENTION_NAME = "dilated"
#: Slot-map codes: a written slot holding padding, and one holding a token (0: not written).
SLOT_PADDING, SLOT_TOKEN = 1, 2


def dilated_attention_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: Any = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask builder registered as ``"dilated"`` with ``transformers.AttentionMaskInterface``.

    Instead of a quadratic ``(batch, 1, q_len, kv_len)`` mask it hands the attention function
    the 2D key padding mask, or None when nothing is padded; with a static cache, the slot map
    (see the [module][dilated.longnet.hf_mask]).

    Args:
        batch_size: batch of the call.
        kv_length: keys the attention will see (with a static cache, all of its slots).
        kv_offset: position of the first key; only 0 (no sliding window cache) is supported.
        mask_function: the mask pattern; only transformers' plain causal pattern is supported.
        attention_mask: None, or transformers' ``(batch, kv_length)`` mask, 1/True for real
            tokens (its convention, the opposite of ``key_padding_mask``'s); with a static
            cache it may cover only the slots written so far.
        **kwargs: the rest of transformers' mask arguments: the query offset (``q_offset`` and
            ``q_length``, or ``cache_position`` in transformers 4). The last query is at the
            last key (a dynamic cache), or before it (a static cache, whose query offset is a
            tensor: it is read on the device).

    Returns:
        None, the bool ``(batch, kv_length)`` ``key_padding_mask``, True at the padding
        (PyTorch's convention: transformers' mask converted, here and only here), or a static
        cache's int8 ``(batch, 1, 1, kv_length)`` slot map.

    Raises:
        ValueError: a pattern other than causal with key padding (a sliding window names
            ``config.sliding_window``), a sliding-window cache (keys from an offset), queries
            past the keys, or a mask longer than the keys.
    """
    if mask_function is not causal_mask_function:
        window = _sliding_window(kwargs)
        if window is not None:
            raise ValueError(
                f"attn_implementation={ATTENTION_NAME!r} does not support sliding-window "
                f"attention (config.sliding_window = {window}; Mistral configs default to 4096): "
                "set config.sliding_window = None before building the model"
            )
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} supports causal attention with key padding "
            f"only, not the mask pattern {getattr(mask_function, '__name__', mask_function)!r} "
            "(sliding windows, packed sequences, bidirectional or custom masks)"
        )
    q_offset, q_length = kwargs.get("q_offset"), kwargs.get("q_length")
    cache_position = kwargs.get("cache_position")
    end: int | torch.Tensor | None = None
    if isinstance(q_offset, (int, torch.Tensor)) and isinstance(q_length, int):
        # A static cache's offset is a device tensor: added there, never read.
        end = q_offset + q_length
    elif q_offset is None and isinstance(cache_position, torch.Tensor):
        # transformers 4 gives only the query positions: one read, once per forward, not per layer.
        end = int(cache_position[-1]) + 1
    if kv_offset != 0 or end is None or (isinstance(end, int) and end > kv_length):
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} needs a cache whose keys start at position "
            f"0 (DynamicCache or StaticCache); got {kv_length} keys from offset {kv_offset!r} "
            f"for queries ending at {end} (sliding-window caches are not supported)"
        )
    real = None if attention_mask is None else attention_mask.to(torch.bool)
    if isinstance(end, int) and end == kv_length:
        return _key_padding_mask(real, kv_length)
    device = end.device if isinstance(end, torch.Tensor) else kwargs.get("device")
    if device is None and real is not None:
        device = real.device
    return _slot_map(real, batch_size, kv_length, end, device)


def _key_padding_mask(real: torch.Tensor | None, kv_length: int) -> torch.Tensor | None:
    if real is None:
        return None
    # transformers: 1 = real token; key_padding_mask (PyTorch's convention): True = padding.
    padding = ~real[:, -kv_length:]
    if padding.shape[1] != kv_length:
        raise ValueError(
            f"attention_mask covers {padding.shape[1]} positions, the keys {kv_length}: it must "
            "be (batch, past + new tokens)"
        )
    # One read per forward buys the fastest backend (most take no mask) for unpadded batches.
    return padding if bool(padding.any()) else None


def _slot_map(
    real: torch.Tensor | None,
    batch: int,
    slots: int,
    end: int | torch.Tensor,
    device: torch.device | str | None,
) -> torch.Tensor:
    written = torch.arange(slots, device=device) < end
    codes = written.to(torch.int8) * SLOT_PADDING
    if real is None:
        codes = (codes * SLOT_TOKEN).expand(batch, slots)
    else:
        if real.shape[1] > slots:
            raise ValueError(
                f"attention_mask covers {real.shape[1]} positions, more than the {slots} slots "
                "of the static cache"
            )
        # Positions past the mask are not written yet (the map says so): their value is moot.
        real = F.pad(real.to(device), (0, slots - real.shape[1]), value=True)
        codes = codes + (written & real).to(torch.int8)
    return codes[:, None, None, :]


def read_slot_map(
    slot_map: torch.Tensor, batch: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(written, token)``, bool ``(batch, slots)`` each (a slot written so far, and one that
    holds a token, not padding), from the slot map of
    [`dilated_attention_mask`][dilated.longnet.hf_mask.dilated_attention_mask]; None when
    ``slot_map`` is not one (another 4D mask, or the map of another batch or cache)."""
    if (
        slot_map.dtype != torch.int8
        or slot_map.dim() != 4
        or tuple(slot_map.shape) != (batch, 1, 1, slots)
    ):
        return None
    codes = slot_map[:, 0, 0]
    return codes > 0, codes == SLOT_TOKEN


def _sliding_window(kwargs: dict[str, Any]) -> int | None:
    """The sliding window of a mask call, or None: transformers passes it as ``local_size``
    (for sdpa) with the model config, whose ``sliding_window`` names it for the user."""
    config = kwargs.get("config")
    window = getattr(config, "sliding_window", None)
    local = kwargs.get("local_size")
    if window is not None and (local is None or local == window):
        return int(window)
    return None
