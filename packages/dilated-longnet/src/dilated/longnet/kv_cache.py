"""The key/value cache of incremental decoding and the one-token dilated attention over it.

Causal dilated attention is prefix-consistent: query ``t`` reads, per branch ``(w, r)``, only the
keys ``u`` of its own segment (``u // w == t // w``) with ``u <= t`` and, for the heads whose phase
is ``t mod r``, ``u = t (mod r)``. So a new token needs at most ``w / r`` cached keys per branch,
whatever number of tokens came before, and the branches are merged with
:func:`dilated.core.merge.merge_attention` exactly as in the full computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dilated.core.merge import merge_attention, safe_logsumexp
from dilated.core.reference import compute_dtype

__all__ = ["KVCache", "LayerKVCache", "cached_dilated_attention"]


class LayerKVCache:
    """Preallocated keys and values of one layer, ``(batch, capacity, kv_heads, head_dim)``."""

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
                smaller batch would otherwise be broadcast into every cached sequence), or
                positions beyond the capacity.
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
        ``(batch, 1, heads, head_dim)`` in the dtype of ``q``: SPEC.md's output for row
        ``position`` of a causal call over the first ``position + 1`` tokens.
    """
    _, _, h, d = q.shape
    hkv = cache.k.shape[2]
    group = h // hkv
    acc = compute_dtype(q.dtype)
    sc = d**-0.5 if scale is None else scale
    qf = q[:, 0].to(acc)  # (b, h, d)
    heads = torch.arange(h, device=q.device)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        start = (position // w) * w
        first = start + (position - start) % r
        # Only u = position (mod r) in the segment can be read, by heads of that phase.
        k = cache.k[:, first : position + 1 : r].to(acc).repeat_interleave(group, dim=2)
        v = cache.v[:, first : position + 1 : r].to(acc).repeat_interleave(group, dim=2)
        s = torch.einsum("bhd,blhd->bhl", qf, k) * sc
        active = (heads % r) == (position % r)  # (h,)
        s = s.masked_fill(~active[None, :, None], float("-inf"))
        lse = safe_logsumexp(s, dim=-1)  # (b, h)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - finite[..., None])
        o = torch.einsum("bhl,blhd->bhd", p, v)
        outs.append(o[:, None])
        lses.append(lse[:, :, None])
    out, _ = merge_attention(outs, lses)
    return out.to(q.dtype)
