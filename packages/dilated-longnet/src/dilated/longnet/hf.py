"""Hugging Face transformers models with dilated attention (``pip install "dilated-longnet[hf]"``).

Importing this module registers the attention implementation ``"dilated"`` with
``transformers.AttentionInterface`` (and its mask builder with ``AttentionMaskInterface``), so any
model whose attention layers go through that interface (Llama, Qwen2, Mistral, ...) runs dilated
attention when built with ``attn_implementation="dilated"``:

```python
import dilated.longnet.hf

dilated.longnet.hf.configure(config, segment_lengths=[2048, 4096], dilation_rates=[1, 2])
model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated")
```

The branches are read from the model config's ``dilated_segment_lengths`` and
``dilated_dilation_rates`` (and the backend from ``dilated_backend``, default ``"auto"``), which
[`configure`][dilated.longnet.hf.configure] validates and sets; they are saved with the config.

Masks: causal attention with an optional key padding mask (the 2D ``attention_mask`` of
transformers, 1 for real tokens) is supported; transformers hands it over as ``(batch, kv_len)``,
never as a quadratic 4D mask. It is converted once, in
[`dilated_attention_mask`][dilated.longnet.hf_mask.dilated_attention_mask], into this library's
``key_padding_mask`` (PyTorch's convention: True = padding, ignored). A 4D mask given by the
caller, packed sequences given as masks, sliding windows, logit soft-capping and attention sinks
raise ``ValueError``.

Caches: ``DynamicCache`` (the default) and ``StaticCache`` (``cache_implementation="static"``, the
compiled-generation path). A decoding step reads at most ``w / r`` cached keys per branch, in ONE
attention over the gathered slots
([`decode_step`][dilated.longnet.kv_cache.decode_step]); with a static cache the position comes
from the slot map (see [`dilated.longnet.hf_mask`][dilated.longnet.hf_mask]) on the device, so the
step has static shapes and no host synchronisation, as ``torch.compile`` needs.

Positions: dilated segments are counted from the first key slot, so left padding counts as
positions; pad on the right to keep the segments of the text.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:  # transformers missing, or older than its mask interface (4.53)
    raise ImportError(
        "dilated.longnet.hf needs transformers>=4.53: pip install 'dilated-longnet[hf]'"
    ) from exc

from dilated.core.checks import check_branches
from dilated.core.functional import dilated_attention as core_dilated_attention
from dilated.core.functional import prepare_call
from dilated.longnet.hf_mask import ATTENTION_NAME, dilated_attention_mask, read_slot_map
from dilated.longnet.kv_cache import decode_slots, decode_step, dilated_attention_at

__all__ = [
    "ATTENTION_NAME",
    "configure",
    "dilated_attention_forward",
    "dilated_attention_mask",
]

ConfigT = TypeVar("ConfigT")

_SEGMENTS = "dilated_segment_lengths"
_RATES = "dilated_dilation_rates"
_BACKEND = "dilated_backend"
# Without dilated-kernels the reference of dilated-core is the only backend.
_CORE_BACKENDS = ("auto", "reference")
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention (set config.sliding_window = None)",
    "s_aux": "attention sinks",
}


#: Whether dilated-kernels is installed, read once without importing it (the import stays lazy,
#: and a compiled forward sees a constant instead of tracing a failing import).
_HAS_KERNELS = importlib.util.find_spec("dilated.kernels") is not None


@functools.cache
def _kernels_op() -> Callable[..., torch.Tensor] | None:
    if not _HAS_KERNELS:
        return None
    from dilated.kernels import dilated_attention

    return dilated_attention


def _backend_names() -> tuple[str, ...]:
    if _kernels_op() is None:
        return _CORE_BACKENDS
    from dilated.kernels import BACKEND_NAMES

    return BACKEND_NAMES


def _check_backend(backend: Any) -> str:
    names = _backend_names()
    if backend not in names:
        hint = "" if _kernels_op() is not None else " (install dilated-kernels for the others)"
        raise ValueError(
            f"dilated backend must be one of {', '.join(names)}{hint}, got {backend!r}"
        )
    return str(backend)


def configure(
    config: ConfigT,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    backend: str = "auto",
) -> ConfigT:
    """Validate the branches and store them on a transformers config; return the config.

    Args:
        config: a ``transformers.PretrainedConfig`` (the model's, before ``from_config`` or
            ``from_pretrained(..., config=config)``).
        segment_lengths: ``w_i`` of each branch; the last segment of a sequence may be shorter.
        dilation_rates: ``r_i`` of each branch, ``w_i % r_i == 0``.
        backend: backend of [`dilated.kernels.dilated_attention`][dilated.kernels.dilated_attention]
            (``"auto"``: the fastest that supports the call); without dilated-kernels installed only
            ``"auto"`` and ``"reference"`` (the dilated-core reference) exist.

    Returns:
        ``config``, with ``dilated_segment_lengths``, ``dilated_dilation_rates`` (lists, so that
        they round-trip through ``config.json``) and ``dilated_backend`` set.

    Raises:
        ValueError: invalid branches (the rules of
            [`check_branches`][dilated.core.checks.check_branches]) or an unknown backend.
    """
    ws, rs = check_branches(segment_lengths, dilation_rates)
    name = _check_backend(backend)
    setattr(config, _SEGMENTS, list(ws))
    setattr(config, _RATES, list(rs))
    setattr(config, _BACKEND, name)
    return config


def _read_config(config: Any) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    missing = [name for name in (_SEGMENTS, _RATES) if getattr(config, name, None) is None]
    if missing:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} reads the branches from the model config, "
            f"which has no {' or '.join(missing)}: call "
            "dilated.longnet.hf.configure(config, segment_lengths, dilation_rates) before "
            "building the model, or set both attributes"
        )
    try:
        ws, rs = check_branches(getattr(config, _SEGMENTS), getattr(config, _RATES))
    except ValueError as exc:
        raise ValueError(f"config.{_SEGMENTS} / config.{_RATES}: {exc}") from None
    return ws, rs, _check_backend(getattr(config, _BACKEND, "auto"))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    backend: str,
    *,
    scale: float | None,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    # transformers' own attention functions do not scan for NaN either (it costs a sync).
    op = _kernels_op()
    if op is None:
        return core_dilated_attention(
            q,
            k,
            v,
            ws,
            rs,
            scale=scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            check_finite=False,
            cu_seqlens=cu_seqlens,
        )
    return op(
        q,
        k,
        v,
        ws,
        rs,
        backend=backend,
        scale=scale,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        check_finite=False,
        cu_seqlens=cu_seqlens,
    )


def _packed_bounds(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``cu_seqlens`` of a packed batch from transformers' padding-free keywords
    (``cu_seq_lens_q``/``cu_seq_lens_k``, e.g. from ``DataCollatorWithFlattening``), or None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or (cu_q is not cu_k and not torch.equal(cu_q, cu_k)):
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} packs sequences for self-attention only: "
            "cu_seq_lens_q and cu_seq_lens_k must be given together and be equal"
        )
    if not isinstance(cu_q, torch.Tensor):
        raise ValueError(f"cu_seq_lens_q must be a tensor, got {type(cu_q).__name__}")
    return cu_q


def dilated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"dilated"`` (called by transformers' attention layers).

    Args:
        module: the calling attention layer; its ``config`` holds the branches and its
            ``is_causal`` the causality (overridden by an ``is_causal`` keyword).
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, kv_len, head_dim)``, ``heads % kv_heads == 0`` (grouped-query
            attention is computed without repeating the keys). With a cache, the keys cover the
            whole prefix and the queries are its last ``q_len`` positions; with a static cache,
            the keys are all of its slots and the queries end at the last written one (a step
            of one query then reads at most ``w / r`` slots per branch, located on the device).
        value: shaped like ``key``.
        attention_mask: what [`dilated_attention_mask`][dilated.longnet.hf_mask.dilated_attention_mask]
            builds from transformers' 2D mask: None, the bool ``(batch, kv_len)`` key padding
            mask (PyTorch's convention, True at the padding, ignored), or with a static cache
            its int8 ``(batch, 1, 1, kv_len)`` slot map.
        dropout: dropout on the attention probabilities.
        scaling: softmax scale, default ``head_dim ** -0.5``.
        **kwargs: the other keywords of transformers (``position_ids``, ...); ``softcap``,
            ``sliding_window`` and ``s_aux`` must be None. ``cu_seq_lens_q`` /
            ``cu_seq_lens_k`` (padding-free packed batches, as transformers passes them to
            flash-attn) make each packed sequence its own call, segments counted from its start.

    Returns:
        ``(out, None)``: ``out`` ``(batch, q_len, heads, head_dim)`` in the dtype of ``query``
        (attention weights are never materialised). Query ``i`` is row ``kv_len - q_len + i`` of
        the dilated attention over all ``kv_len`` keys: cached decoding equals full recomputation.

    Raises:
        ValueError: missing or invalid branches in the config, a mask other than a key padding
            mask or slot map (a 4D mask of the caller), more queries than keys, or an
            unsupported feature.
    """
    ws, rs, backend = _read_config(module.config)
    for name, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={ATTENTION_NAME!r} does not support {feature}")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    # (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim): views, no copies.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    b, n_q, _, _ = q.shape
    n_kv = k.shape[1]
    slots = None if attention_mask is None else read_slot_map(attention_mask, b, n_kv)
    if slots is not None:
        written, token = slots
        if n_q == 1 and dropout == 0.0 and causal:
            return _static_decode_step(q, k, v, written, token, ws, rs, scaling), None
        # A prompt (or a chunk) into a static cache: its keys are the written prefix, one
        # read per layer (a prefill costs far more than the read).
        end, tokens = (int(x) for x in torch.stack([written[0].sum(), token.sum()]).tolist())
        k, v, n_kv = k[:, :end], v[:, :end], end
        attention_mask = None if tokens == b * end else ~token[:, :end]
    elif attention_mask is not None and (
        attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (b, n_kv)
    ):
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} supports only a key padding mask, bool "
            f"(batch, kv_len) = {(b, n_kv)}, got {attention_mask.dtype} "
            f"{tuple(attention_mask.shape)} (True = padding): pass the 2D attention_mask of "
            "transformers (1 for real tokens), not a 4D mask"
        )
    if n_q == n_kv:
        return (
            _attend(
                q,
                k,
                v,
                ws,
                rs,
                backend,
                scale=scaling,
                is_causal=causal,
                key_padding_mask=attention_mask,
                dropout_p=dropout,
                cu_seqlens=_packed_bounds(kwargs),
            ),
            None,
        )
    if n_q > n_kv or not causal:
        raise ValueError(
            f"attn_implementation={ATTENTION_NAME!r} needs as many queries as keys, or fewer in "
            f"causal decoding with a cache; got {n_q} queries and {n_kv} keys (causal={causal})"
        )
    if n_q == 1 and dropout == 0.0:
        # One new token reads at most w / r cached keys per branch, whatever the prefix length.
        out = dilated_attention_at(
            q, k, v, n_kv - 1, ws, rs, scale=scaling, key_padding_mask=attention_mask
        )
        return out, None
    # Several new tokens over a cached prefix (chunked prefill, assisted decoding): causal rows
    # depend only on their own query, so the prefix rows are given zero queries and dropped.
    q_full = torch.cat([q.new_zeros(b, n_kv - n_q, *q.shape[2:]), q], dim=1)
    out = _attend(
        q_full,
        k,
        v,
        ws,
        rs,
        backend,
        scale=scaling,
        is_causal=True,
        key_padding_mask=attention_mask,
        dropout_p=dropout,
    )
    return out[:, n_kv - n_q :], None


def _static_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    written: torch.Tensor,
    token: torch.Tensor,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    scale: float | None,
) -> torch.Tensor:
    """One new token over all of a static cache's slots: its position is the last written slot,
    found on the device, so the step has static shapes and no host synchronisation."""
    _, _, sc, _ = prepare_call(
        q, k, v, ws, rs, scale=scale, key_padding_mask=None, dropout_p=0.0,
        check_finite_inputs=False, is_causal=True, decoding=True,
    )  # fmt: skip
    position = written[0].sum() - 1
    return decode_step(q, k, v, position, decode_slots(ws, rs, q.shape[2], q.device), scale=sc,
                       key_mask=token)  # fmt: skip


AttentionInterface.register(ATTENTION_NAME, dilated_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, dilated_attention_mask)
