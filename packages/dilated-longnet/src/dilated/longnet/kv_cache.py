"""The key/value cache of incremental decoding and the one-token dilated attention over it.

Causal dilated attention is prefix-consistent: query ``t`` reads, per branch ``(w, r)``, only the
keys ``u`` of its own segment (``u // w == t // w``) with ``u <= t`` and, for the heads whose phase
is ``t mod r``, ``u = t (mod r)``. So a new token needs at most ``w / r`` cached keys per branch,
whatever number of tokens came before, and the branches are merged with
[`dilated.core.merge.merge_attention`][dilated.core.merge.merge_attention] exactly as in the full computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.branches import head_index, phase_heads
from dilated.core.checks import check_index, check_instance, check_positive_int
from dilated.core.functional import prepare_call
from dilated.core.merge import merge_attention
from dilated.core.reference import compute_dtype, dense_segment_attention

__all__ = ["KVCache", "LayerKVCache", "cached_dilated_attention", "dilated_attention_at"]


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


class KVCache:
    """Per-layer caches plus ``length``, the number of positions already written."""

    def __init__(self, layers: Sequence[LayerKVCache]) -> None:
        self.layers = list(layers)
        self.length = 0


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
        key_padding_mask: bool ``(batch, n)``, True for real tokens; padded keys are never seen.

    Returns:
        ``(batch, 1, heads, head_dim)`` in the dtype of ``q``: row ``position`` of a causal call
        over the first ``position + 1`` keys (0 for a query that sees no key).

    Raises:
        ValueError / TypeError: naming the argument, what the single-process op refuses (the
            same checks: branch lists, grouped heads, dtypes, devices, scale, mask), a ``q``
            of more than one row, and a ``position`` that is not an int in ``[0, n)``.
    """
    ws, rs, sc = prepare_call(
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
    b, _, h, d = q.shape
    work = compute_dtype(q.dtype)
    outs, lses = [], []
    for w, r in zip(ws, rs):
        start = (position // w) * w
        first = start + (position - start) % r
        phase = position % r
        out = q.new_zeros(b, 1, h, d, dtype=work)
        lse = torch.full((b, h, 1), float("-inf"), dtype=work, device=q.device)
        if phase < h:
            # Only keys u = position (mod r) of the segment, read by the heads of that phase:
            # one dense sub-problem of one query row.
            heads, kv_of = phase_heads(h, k.shape[2], r, phase)
            keys = head_index(tuple(kv_of.tolist()), k.device)
            kb = k[:, first : position + 1 : r]
            vb = v[:, first : position + 1 : r]
            kb, vb = (
                x[:, :, keys] if isinstance(keys, slice) else x.index_select(2, keys)
                for x in (kb, vb)
            )
            mask = (
                None if key_padding_mask is None else key_padding_mask[:, first : position + 1 : r]
            )
            o, l_part = _attend(q[:, :, heads], kb, vb, sc, mask)
            out[:, :, heads] = o.to(work)
            lse[:, heads] = l_part.to(work)
        outs.append(out)
        lses.append(lse)
    merged, _ = merge_attention(outs, lses)
    return merged.to(q.dtype)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared sub-problem primitive of dilated-kernels when it is installed (cuDNN on CUDA),
    else the portable one of dilated-core: ``(out, lse)`` of ``(b, 1, heads, d)`` queries."""
    try:
        from dilated.kernels.subproblem import subproblem_attention
    except ImportError:
        work = compute_dtype(q.dtype)
        return dense_segment_attention(
            q.to(work), k.to(work), v.to(work), key_mask, scale, False, 0.0
        )
    return subproblem_attention(q, k, v, scale=scale, key_mask=key_mask)
