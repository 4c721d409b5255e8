"""The key/value cache of incremental decoding and the one-token dilated attention over it.

Causal dilated attention is prefix-consistent: query ``t`` reads, per branch ``(w, r)``, only the
keys ``u`` of its own segment (``u // w == t // w``) with ``u <= t`` and, for the heads whose phase
is ``t mod r``, ``u = t (mod r)``. So a new token needs at most ``w / r`` cached keys per branch,
whatever number of tokens came before.

Merging the branches by their log-sum-exp equals one softmax over the concatenation of their key
sets (a key two branches share counts twice, as in the merge). So a decoding step is one
attention of the query over ``sum_i w_i / r_i`` gathered keys, with a mask saying which head
reads which slot: the slots' positions are arithmetic in ``t`` (computed on the device, so the
step has static shapes and no host synchronisation, and can be captured in a CUDA graph), and
there is no per-branch call and no merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dilated.core.base import BaseDilatedAttention
from dilated.core.caching import LastStep, plan_cache
from dilated.core.checks import check_index, check_instance, check_positive_int, check_scale
from dilated.core.functional import prepare_call

__all__ = [
    "DecodeSlots",
    "KVCache",
    "LayerKVCache",
    "SlotIndex",
    "attend_with_cache",
    "cached_dilated_attention",
    "decode_slots",
    "decode_step",
    "dilated_attention_at",
]


class LayerKVCache:
    """Preallocated keys and values of one layer, ``(batch, capacity, kv_heads, head_dim)``.

    Raises:
        ValueError: ``batch``, ``capacity``, ``kv_heads`` or ``head_dim`` is not a positive int.
    """

    def __init__(
        self,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        sizes = {"batch": batch, "capacity": capacity, "kv_heads": kv_heads, "head_dim": head_dim}
        for name, size in sizes.items():
            check_positive_int(name, size)
        self.k = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return self.k.shape[1]

    def write(self, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``(batch, n, kv_heads, head_dim)`` at positions ``offset..offset+n``.

        Raises:
            ValueError: shapes other than the cache's ``(batch, ·, kv_heads, head_dim)`` (a
                smaller batch would otherwise be broadcast into every cached sequence), an
                ``offset`` that is not an int in ``[0, capacity)``, or positions beyond the
                capacity.
        """
        b, _, hkv, d = self.k.shape
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (b, hkv, d):
                raise ValueError(
                    f"{name} of shape {tuple(t.shape)} does not fit a KV cache of batch {b}, "
                    f"{hkv} kv heads and head_dim {d}: (batch, n, kv_heads, head_dim) = "
                    f"({b}, n, {hkv}, {d}) expected"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
        check_index("offset", offset, self.capacity, f"a KV cache of capacity {self.capacity}")
        end = offset + k.shape[1]
        if end > self.capacity:
            raise ValueError(
                f"KV cache of capacity {self.capacity} cannot hold positions up to {end}; "
                "create it with a larger max_length"
            )
        self.k[:, offset:end] = k
        self.v[:, offset:end] = v

    def write_at(self, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``(batch, n, kv_heads, head_dim)`` from ``position``, a 0-d int64
        tensor on the cache's device: no host synchronisation, capturable in a CUDA graph.

        The shapes are checked as in [`write`][dilated.longnet.kv_cache.LayerKVCache.write];
        ``position + n <= capacity`` is the caller's to keep (it is a device value), as
        [`StaticDecoder`][dilated.longnet.static_decoder.StaticDecoder] does on the host.
        """
        b, _, hkv, d = self.k.shape
        if (
            k.dim() != 4
            or (k.shape[0], k.shape[2], k.shape[3]) != (b, hkv, d)
            or k.shape != v.shape
        ):
            raise ValueError(
                f"k and v of shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit a KV cache of "
                f"batch {b}, {hkv} kv heads and head_dim {d}"
            )
        index = position + torch.arange(k.shape[1], device=self.k.device)
        self.k.index_copy_(1, index, k.to(self.k.dtype))
        self.v.index_copy_(1, index, v.to(self.v.dtype))


class KVCache:
    """Per-layer caches plus ``length``, the number of positions already written."""

    def __init__(self, layers: Sequence[LayerKVCache]) -> None:
        self.layers = list(layers)
        self.length = 0


def attend_with_cache(
    attention: BaseDilatedAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerKVCache,
    offset: int | torch.Tensor,
    *,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Causal self-attention of ``n`` new tokens at positions ``offset..offset+n`` through a cache.

    ``k``/``v`` are written into ``cache`` first. At ``offset == 0`` (a prompt) ``attention``
    runs on the new tokens; after it, each new row is one
    [`decode_step`][dilated.longnet.kv_cache.decode_step] over the cached keys. A tensor
    ``offset`` (0-d int64 on the device, one token: the static step of
    [`StaticDecoder`][dilated.longnet.static_decoder.StaticDecoder]) writes and reads with no
    host synchronisation.

    Args:
        attention: the layer's inner attention module (its branches and scale are used).
        q: ``(batch, n, heads, head_dim)``, rotated already.
        k, v: ``(batch, n, kv_heads, head_dim)``, rotated already.
        cache: the layer's cache.
        offset: position of the first new token (``cache.length`` of the model's cache).
        is_causal: must be True.
        key_padding_mask: must be None.

    Returns:
        ``(batch, n, heads, head_dim)`` in the dtype of ``q``.

    Raises:
        ValueError: ``attention`` computing another function than dilated attention (a
            block-sparse layout), ``is_causal=False``, a ``key_padding_mask``, more than one
            token with a tensor ``offset``, and what
            [`LayerKVCache.write`][dilated.longnet.kv_cache.LayerKVCache.write] refuses.
    """
    if not attention.computes_dilated_attention:
        raise ValueError(
            f"a KV cache reproduces plain dilated attention; {type(attention).__name__} "
            "computes another function (e.g. a block-sparse layout): generate without a cache"
        )
    if not is_causal:
        raise ValueError("a KV cache needs causal self-attention (is_causal=True)")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask is not supported together with a KV cache")
    ac = attention.config
    # Under autocast q comes in the autocast dtype and the cache keeps the parameters' (the
    # write converts k and v): a cached step computes in the cache's, like its keys.
    if isinstance(offset, torch.Tensor):
        if q.shape[1] != 1:
            raise ValueError(
                f"a device-side position decodes one token per sequence, got {q.shape[1]}"
            )
        cache.write_at(offset, k, v)
        slots = decode_slots(ac.segment_lengths, ac.dilation_rates, q.shape[2], q.device)
        scale = check_scale(ac.scale, q.shape[-1])
        out = decode_step(q.to(cache.k.dtype), cache.k, cache.v, offset, slots, scale=scale)
        return out.to(q.dtype)
    cache.write(offset, k, v)
    if offset == 0:
        prompt: torch.Tensor = attention(q, k, v, is_causal=True)
        return prompt
    qc = q.to(cache.k.dtype)
    rows = [
        cached_dilated_attention(
            qc[:, i : i + 1], cache, offset + i, ac.segment_lengths, ac.dilation_rates, ac.scale
        )
        for i in range(q.shape[1])
    ]
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).to(q.dtype)


def cached_dilated_attention(
    q: torch.Tensor,
    cache: LayerKVCache,
    position: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    scale: float | None = None,
) -> torch.Tensor:
    """Causal dilated attention of one query at ``position`` over the cached keys.

    Args:
        q: ``(batch, 1, heads, head_dim)``; keys/values up to and including ``position`` must
            already be in ``cache``.
        cache: the layer's cache (``(batch, capacity, kv_heads, head_dim)``).
        position: absolute position of the query.
        segment_lengths, dilation_rates: the branches.
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns:
        ``(batch, 1, heads, head_dim)`` in the dtype of ``q``: the output for row
        ``position`` of a causal call over the first ``position + 1`` tokens.

    Raises:
        ValueError / TypeError: what the single-process op refuses (see
            [`dilated_attention_at`][dilated.longnet.kv_cache.dilated_attention_at]), and a
            ``position`` at or beyond the cache's capacity.
    """
    check_instance("cache", cache, LayerKVCache, "a LayerKVCache")
    # Named as the cache's bound: the keys past it were never stored, not merely unwritten.
    check_index(
        "position",
        position,
        cache.capacity,
        f"the KV cache holds {cache.capacity} positions; create it with a larger max_length",
    )
    return dilated_attention_at(
        q, cache.k, cache.v, position, segment_lengths, dilation_rates, scale=scale
    )


def dilated_attention_at(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal dilated attention of one query at ``position`` over keys ``k[:, :position + 1]``.

    What [`cached_dilated_attention`][dilated.longnet.kv_cache.cached_dilated_attention] computes,
    over any key/value tensors (a preallocated cache, or the growing cache of another library).
    Per branch it reads at most ``w / r`` keys, so its cost does not depend on ``position``.

    Args:
        q: ``(batch, 1, heads, head_dim)``.
        k: ``(batch, n, kv_heads, head_dim)`` with ``n > position``, ``heads % kv_heads == 0``;
            any strides (a transposed view is read in place).
        v: values, shaped like ``k``.
        position: absolute position of the query (and index of its own key).
        segment_lengths, dilation_rates: the branches.
        scale: softmax scale, default ``head_dim ** -0.5``.
        key_padding_mask: ``(batch, n)``, PyTorch's convention: bool True (or float ``-inf``)
            at the keys to ignore (padding); ignored keys are never seen.

    Returns:
        ``(batch, 1, heads, head_dim)`` in the dtype of ``q``: row ``position`` of a causal call
        over the first ``position + 1`` keys (0 for a query that sees no key).

    Raises:
        ValueError / TypeError: naming the argument, what the single-process op refuses (the
            same checks: branch lists, grouped heads, dtypes, devices, scale, mask), a ``q``
            of more than one row, and a ``position`` that is not an int in ``[0, n)``.
    """
    ws, rs, sc, key_mask = prepare_call(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        scale=scale,
        key_padding_mask=key_padding_mask,
        dropout_p=0.0,
        # A decoding step reads at most w / r keys per branch; scanning the whole cache for
        # NaN/Inf every token would cost what the cache saves.
        check_finite_inputs=False,
        is_causal=True,
        decoding=True,
    )
    check_index("position", position, k.shape[1], f"k holds {k.shape[1]} positions")
    slots = decode_slots(ws, rs, q.shape[2], q.device)
    return decode_step(q, k, v, position, slots, scale=sc, key_mask=key_mask)


class DecodeSlots:
    """The key slots of one decoding step, constant per (branches, heads, device).

    Slot ``j`` of branch ``i`` (``0 <= j < w_i / r_i``) holds key ``(t // w_i) w_i + t % r_i +
    r_i j`` of the query at position ``t``: the ``j``-th key of its segment in its phase. The
    branches' slots follow one another, in branch order.

    Attributes:
        w: ``(slots,)`` int64, the slot's segment length.
        r: ``(slots,)`` int64, the slot's dilation rate.
        j: ``(slots,)`` int64, the slot's index within its branch.
        head_phase: ``(heads, slots)`` int64, ``head % r`` of each head for each slot (the head
            reads the slot when this equals ``t % r``).
    """

    def __init__(
        self, ws: Sequence[int], rs: Sequence[int], heads: int, device: torch.device
    ) -> None:
        counts = [w // r for w, r in zip(ws, rs)]
        self.w = torch.repeat_interleave(torch.tensor(ws), torch.tensor(counts)).to(device)
        self.r = torch.repeat_interleave(torch.tensor(rs), torch.tensor(counts)).to(device)
        self.j = torch.cat([torch.arange(c) for c in counts]).to(device)
        self.head_phase = torch.arange(heads, device=device)[:, None] % self.r[None, :]
        #: A branch of rate 1 gives every head key t itself: no head sees nothing.
        self.every_head_reads_t = 1 in rs
        self._last: LastStep[tuple[int, int, torch.dtype], SlotIndex] = LastStep()

    def index(
        self, position: torch.Tensor, keys: int, dtype: torch.dtype = torch.float32
    ) -> SlotIndex:
        """The slots' keys for the query at ``position`` (0-d int64 on the slots' device) over
        ``keys`` cached positions, computed on the device; its additive mask in ``dtype``."""
        t = position
        index = (t // self.w) * self.w + t % self.r + self.r * self.j
        # A slot in the future reads key t instead: written, so finite, where the future may
        # hold anything (a masked NaN score stays NaN in the softmax).
        present = (index <= t)[None, :]
        in_phase = self.head_phase == (t % self.r)[None, :]
        allowed = in_phase & present
        # Additive, in the queries' dtype: SDPA converts a boolean mask at every call (about
        # 40 us of host per layer on an H100), this is once per step.
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        bias.masked_fill_(~allowed, float("-inf"))
        return SlotIndex(
            torch.minimum(index, t).clamp(0, keys - 1), present, in_phase, allowed, bias
        )

    def index_at(self, position: int, keys: int, dtype: torch.dtype = torch.float32) -> SlotIndex:
        """[`index`][dilated.longnet.kv_cache.DecodeSlots.index] of an int position, kept
        for the last one asked: every layer of an eager decoding step asks for the same, and
        computing it once saves each further layer a copy to the device and about ten
        launches."""

        def build() -> SlotIndex:
            t = torch.tensor(position, dtype=torch.int64).to(self.w.device, non_blocking=True)
            return self.index(t, keys, dtype)

        return self._last.get_or_build((position, keys, dtype), build)


class SlotIndex(NamedTuple):
    """Where the slots of [`DecodeSlots`][dilated.longnet.kv_cache.DecodeSlots] read for one
    query position ``t``.

    Attributes:
        keys: ``(slots,)`` int64, each slot's key (``t`` for a slot after ``t``), clamped
            into the cache.
        present: bool ``(1, slots)``, the slot's key is at or before ``t``.
        in_phase: bool ``(heads, slots)``, the head reads the slot (its phase is ``t``'s).
        allowed: bool ``(heads, slots)``, both (without key padding: the step's mask, computed
            once for every layer).
        bias: ``allowed`` as an additive mask ``(heads, slots)``: 0 where allowed, ``-inf``
            elsewhere, in the dtype asked for.
    """

    keys: torch.Tensor
    present: torch.Tensor
    in_phase: torch.Tensor
    allowed: torch.Tensor
    bias: torch.Tensor


@plan_cache("dilated.longnet.kv_cache.decode_slots", maxsize=64, key="(ws, rs, heads, device)")
def _slots(
    ws: tuple[int, ...], rs: tuple[int, ...], heads: int, device: torch.device
) -> DecodeSlots:
    return DecodeSlots(ws, rs, heads, device)


def decode_slots(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], heads: int, device: torch.device
) -> DecodeSlots:
    """The [`DecodeSlots`][dilated.longnet.kv_cache.DecodeSlots] of these branches (cached)."""
    return _slots(tuple(segment_lengths), tuple(dilation_rates), heads, torch.device(device))


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position: torch.Tensor | int,
    slots: DecodeSlots,
    *,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step on validated inputs: ONE attention over the gathered keys.

    Static shapes whatever ``position``, no host synchronisation: capturable in a CUDA graph
    and by ``torch.compile(mode="reduce-overhead")`` with ``position`` a device tensor that the
    caller updates in place.

    Args:
        q: ``(batch, 1, heads, head_dim)``.
        k: ``(batch, n, kv_heads, head_dim)``, ``n > position``; v shaped like it.
        position: 0-d int64 tensor on the device of ``q``, in ``[0, n)`` (not checked here: an
            index outside is clamped, so nothing outside ``k`` is read); or an int (eager
            decoding: its slot index is computed once for every layer).
        slots: [`decode_slots`][dilated.longnet.kv_cache.decode_slots] of the branches and the
            query heads.
        scale: softmax scale.
        key_mask: None, or bool ``(batch, n)``, True at a key that may be attended: the
            internal form [`prepare_call`][dilated.core.functional.prepare_call] makes of a
            public ``key_padding_mask`` (whose True means *ignored*).

    Returns:
        ``(batch, 1, heads, head_dim)`` in the dtype of ``q`` (0 for a head that sees no key).
    """
    b, _, h, d = q.shape
    hkv = k.shape[2]
    if isinstance(position, int):
        index_c, present, in_phase, allowed, bias = slots.index_at(position, k.shape[1], q.dtype)
    else:
        index_c, present, in_phase, allowed, bias = slots.index(position, k.shape[1], q.dtype)
    keys = k.index_select(1, index_c)  # (b, slots, hkv, d)
    values = v.index_select(1, index_c)
    # A head reads a present slot when it is in the slot's phase. The query heads of one
    # key/value head are the rows of its problem: one attention for every head and branch.
    allowed = allowed.view(1, hkv, h // hkv, -1)
    mask = bias.view(1, hkv, h // hkv, -1)
    if key_mask is not None:
        # A slot holds a key when it is at or before t and not padding. Padding may hold
        # anything, NaN included: zeroed, not only masked (a masked NaN score stays NaN).
        present = present & key_mask.index_select(1, index_c)  # (batch, slots)
        keys, values = (torch.where(present[:, :, None, None], x, 0.0) for x in (keys, values))
        allowed = in_phase.view(1, hkv, h // hkv, -1) & present[:, None, None, :]
        mask = allowed
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv, h // hkv, d), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    if key_mask is not None or not slots.every_head_reads_t:
        # A head that sees no key gets 0 (a softmax over nothing is NaN).
        out = torch.where(allowed.any(-1, keepdim=True), out, 0.0)
    return out.reshape(b, 1, h, d)
