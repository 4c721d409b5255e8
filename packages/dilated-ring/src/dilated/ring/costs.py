"""Cost model: bytes each rank sends per layer, as a formula of the shapes and branches.

Notation: ``n`` tokens over ``P`` ranks (shard ``s = n / P``), batch ``b``, ``h`` query heads,
``h_kv`` key/value heads, head dim ``d``, element size ``e`` (of q/k/v) and ``e_c`` (the compute
dtype: float32 for 16-bit inputs). For branch ``i`` with ``(w_i, r_i)``:

* ``G_i``: ranks in a segment group: 1 when the branch is local (a chunk of the sharding is a
  multiple of ``w_i``), ``w_i / s`` for contiguous shards with ``s < w_i < n``, else ``P``.
* ``K_i = sum_{p < min(r_i, h)} |{ j // (h / h_kv) : j = p mod r_i }|``: key/value heads read by
  the query heads of the phases (``= h`` without grouped-query attention, at most ``r_i * h_kv``).
* ``E_i = 2 * b * (s / r_i) * K_i * d``: elements of one rank's phase rows of K and V.

Ring strategy: forward ``sum_i (G_i - 1) E_i e``; backward ``sum_i [(G_i - 1) E_i e + G_i E_i e_c]``
over the spanning branches (K/V rotate again, and their gradients travel a full turn with them).

All-gather strategy: forward ``sum_i (G_i - 1) E_i e`` (each block goes to the ``G_i - 1``
peers at once); backward ``sum_i (G_i - 1) E_i (e + e_c)`` (gather again, then each peer's key
gradients go straight back to it: a reduce-scatter).

Ulysses strategy (independent of the branches): with ``h'_kv = h_kv`` when ``h_kv % P == 0``,
else ``h`` (key/value heads repeated before the exchange), forward and backward each
``b s d (P - 1) / P * (2 h + 2 h'_kv) * e``: q, k and v go out, the output comes back (forward);
the output gradient goes out, the q/k/v gradients come back (backward, all in q's dtype).

A key padding mask adds ``(P - 1) b s`` bytes to the forward pass of every strategy (its
``(b, s)`` shard, one byte per token, goes to every peer once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dilated.core.reference import compute_dtype
from dilated.ring.schedules import SCHEDULES
from dilated.ring.sharding import chunk_length

__all__ = ["CommCost", "comm_cost", "group_size", "kv_heads_read"]


@dataclass(frozen=True)
class CommCost:
    """Bytes one rank sends in one layer."""

    forward_bytes: int
    backward_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


def group_size(seq: int, world_size: int, w: int, load_balance: str = "contiguous") -> int:
    """``G``: ranks whose keys one rank's queries may read in a branch of segment length ``w``."""
    if chunk_length(seq, world_size, load_balance) % w == 0:
        return 1
    if load_balance == "contiguous" and w < seq:
        return w // (seq // world_size)
    return world_size


def kv_heads_read(heads: int, kv_heads: int, r: int) -> int:
    """``K``: key/value heads sent per phase row, summed over the phases of rate ``r``."""
    g = heads // kv_heads
    return sum(len({j // g for j in range(p, heads, r)}) for p in range(min(r, heads)))


def comm_cost(
    seq: int,
    world_size: int,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
    *,
    batch: int = 1,
    kv_heads: int | None = None,
    strategy: str = "ring",
    load_balance: str = "contiguous",
    key_padding_mask: bool = False,
) -> CommCost:
    """Bytes one rank sends per layer (exact when ``s / r_i`` is an integer, i.e. every rank
    holds the same number of rows of each phase; contiguous or zigzag shards).

    Args:
        seq: total tokens ``n``; world_size: ``P``; heads, head_dim, kv_heads: as in the layer.
        segment_lengths, dilation_rates: the branches.
        dtype: dtype of q/k/v.
        strategy: ``"ring"``, ``"allgather"`` or ``"ulysses"``.
        load_balance: the sharding.
        key_padding_mask: whether a key padding mask is passed.

    The backward bytes assume that q, k and v all require gradients.
    """
    if strategy != "ulysses" and strategy not in SCHEDULES:
        raise ValueError(f"strategy must be one of {(*SCHEDULES, 'ulysses')}, got {strategy!r}")
    hkv = heads if kv_heads is None else kv_heads
    e = torch.empty(0, dtype=dtype).element_size()
    e_c = torch.empty(0, dtype=compute_dtype(dtype)).element_size()
    s = seq // world_size
    mask_bytes = (world_size - 1) * batch * s if key_padding_mask else 0
    if strategy == "ulysses":
        hkv_sent = hkv if hkv % world_size == 0 else heads
        per_pass = batch * s * head_dim * (world_size - 1) * (2 * heads + 2 * hkv_sent)
        per_pass = per_pass // world_size * e
        return CommCost(forward_bytes=per_pass + mask_bytes, backward_bytes=per_pass)
    schedule = SCHEDULES[strategy]
    fwd, bwd = mask_bytes, 0
    for w, r in zip(segment_lengths, dilation_rates):
        g = group_size(seq, world_size, w, load_balance)
        if g == 1:
            continue
        elements = 2 * batch * (s // r) * kv_heads_read(heads, hkv, r) * head_dim
        blocks = schedule.forward_sends(g)
        fwd += blocks * elements * e
        bwd += blocks * elements * e + schedule.gradient_sends(g) * elements * e_c
    return CommCost(forward_bytes=fwd, backward_bytes=bwd)
