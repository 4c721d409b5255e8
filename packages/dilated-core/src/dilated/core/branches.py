"""The per-branch, per-phase loop of dilated attention, around a pluggable dense kernel.

Every branch ``(w, r)`` and phase ``p`` is a batch of independent dense problems over a strided
view of the ``(batch, seq, heads, head_dim)`` input (rows ``p, p + r, ...`` of heads
``p, p + r, ...``), cut into segments of ``w / r`` rows; the last segment may be shorter. The
reference ([`dilated.core.reference`][dilated.core.reference]) and every backend that calls a dense attention kernel
(dilated-kernels' sdpa and flash) supply only that kernel ([`DenseAttention`][dilated.core.branches.DenseAttention]); the branches
are merged with [`dilated.core.merge.merge_attention`][dilated.core.merge.merge_attention].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dilated.core.caching import plan_cache
from dilated.core.merge import merge_attention

__all__ = [
    "DenseAttention",
    "SubProblem",
    "compute_dtype",
    "head_index",
    "phase_heads",
    "run_branches",
    "subproblems",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sub-problems are computed in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def head_index(heads: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """``heads`` as an index of dim 2: a slice when they are an arithmetic progression (a view),
    else a long tensor on ``device``, built once per set of heads and device (a host-to-device
    copy on every call would synchronise the host with the device)."""
    heads = tuple(heads)
    step = heads[1] - heads[0] if len(heads) > 1 else 1
    if step > 0 and all(b - a == step for a, b in itertools.pairwise(heads)):
        return slice(heads[0], heads[-1] + 1, step)
    if torch.compiler.is_compiling():
        # A graph holds its constants itself; Dynamo would trace through the cache (and warn).
        return torch.tensor(heads, device=device)
    return _index_tensor(heads, device)


@plan_cache("dilated.core.branches.head_index", maxsize=4096, key="(heads, device)")
def _index_tensor(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, device=device)


def phase_heads(heads_q: int, heads_kv: int, rate: int, phase: int) -> tuple[slice, torch.Tensor]:
    """Query heads of one phase (``j mod rate == phase``) and the key/value head each one reads.

    Returns a slice over query heads and a long tensor of key/value head indices (``j // group``).
    """
    group = heads_q // heads_kv
    return slice(phase, heads_q, rate), torch.arange(phase, heads_q, rate) // group


#: ``(q, k, v, key_mask, scale, is_causal, dropout_p) -> (out, lse)`` over ``(B, L, H, D)``
#: inputs (``key_mask`` ``(B, L)`` or None); returns ``out`` ``(B, L, H, D)`` in the compute dtype
#: and ``lse`` ``(B, H, L)`` float32 (float64 for float64 inputs), ``-inf`` for empty rows.
DenseAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float, bool, float],
    tuple[torch.Tensor, torch.Tensor],
]
"""A dense attention kernel ``(q, k, v, key_mask, scale, is_causal, dropout_p) -> (out, lse)``
over one sub-problem, the only part a backend supplies."""


@dataclass(frozen=True)
class SubProblem:
    """One batched dense call of a branch ``(w, r)``: ``count`` segments of ``length`` rows.

    The rows are positions ``t = phase (mod rate)`` (the ``start``-th to ``stop``-th of them),
    the query heads those of that phase; ``kv_heads`` are the key/value heads they read, one
    per query head. Full segments form one call, a shorter last segment a second one, so no
    padding row ever enters a softmax.
    """

    phase: int
    rate: int
    heads: slice
    kv_heads: tuple[int, ...]
    start: int
    stop: int
    length: int

    @property
    def count(self) -> int:
        """Segments in the call."""
        return (self.stop - self.start) // self.length

    def kv_view(self, heads: int, kv_heads: int) -> slice | tuple[int, ...]:
        """The key/value heads to cut: the query heads' slice (a view) without grouped-query
        attention, else one key/value head per query head (a copy)."""
        return self.heads if heads == kv_heads else self.kv_heads

    def rows(self, x: torch.Tensor, heads: slice | tuple[int, ...]) -> torch.Tensor:
        """The call's rows ``(batch, stop - start, heads, ...)`` of ``x`` ``(batch, seq, heads, ...)``
        (a view for a slice of heads, a copy for an index tuple)."""
        part = x[:, self.phase :: self.rate][:, self.start : self.stop]
        if isinstance(heads, slice):
            return part[:, :, heads]
        index = head_index(heads, x.device)
        return part[:, :, index] if isinstance(index, slice) else part.index_select(2, index)

    def cut(self, x: torch.Tensor, heads: slice | tuple[int, ...]) -> torch.Tensor:
        """``(batch * count, length, heads, ...)``: the call's input cut from ``x``."""
        part = self.rows(x, heads)
        return part.reshape(part.shape[0] * self.count, self.length, *part.shape[2:])

    def cut_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``(batch * count, length)`` of a ``(batch, seq)`` key padding mask (None stays None)."""
        if mask is None:
            return None
        rows = mask[:, self.phase :: self.rate][:, self.start : self.stop]
        return rows.reshape(rows.shape[0] * self.count, self.length)

    def cut_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """``(batch * count, heads, length)`` of a ``(batch, heads, seq)`` log-sum-exp."""
        part = lse[:, self.heads, self.phase :: self.rate][..., self.start : self.stop]
        b, h = part.shape[:2]
        return (
            part.reshape(b, h, self.count, self.length)
            .permute(0, 2, 1, 3)
            .reshape(b * self.count, h, self.length)
        )

    def uncut(self, part: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of [`cut`][dilated.core.branches.SubProblem.cut]: ``(batch, stop - start, heads, ...)``."""
        return part.reshape(batch, self.count * self.length, *part.shape[2:])

    def uncut_lse(self, part: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of [`cut_lse`][dilated.core.branches.SubProblem.cut_lse]: ``(batch, heads, stop - start)``."""
        h = part.shape[1]
        return (
            part.reshape(batch, self.count, h, self.length)
            .permute(0, 2, 1, 3)
            .reshape(batch, h, -1)
        )


def subproblems(
    seq: int, heads: int, kv_heads: int, w: int, r: int, head_offset: int = 0
) -> list[SubProblem]:
    """Every dense call of branch ``(w, r)`` on a sequence of ``seq`` positions.

    ``head_offset``: local head ``j`` is head ``head_offset + j`` of a larger layer and takes
    that head's phase (used when each rank holds a slice of the heads).
    """
    group = heads // kv_heads
    rows_per_segment = w // r
    calls = []
    for c in range(min(r, heads)):
        phase = (c + head_offset) % r
        rows = len(range(phase, seq, r))
        if rows == 0:
            continue
        hs = slice(c, heads, r)
        kv = tuple(j // group for j in range(heads)[hs])
        full = min(rows, (seq // w) * rows_per_segment)
        for start, stop, length in ((0, full, rows_per_segment), (full, rows, rows - full)):
            if stop > start:
                calls.append(SubProblem(phase, r, hs, kv, start, stop, length))
    return calls


def _one_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: int,
    r: int,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    dense: DenseAttention,
    lse_dtype: torch.dtype,
    head_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, hq, _ = q.shape
    hkv = k.shape[2]
    # *_like of q, not new_zeros/full: under torch.func.vmap these are batched like q, so the
    # in-place writes below stay legal.
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full_like(
        q[..., 0].transpose(1, 2),
        float("-inf"),
        dtype=lse_dtype,
        memory_format=torch.contiguous_format,
    )
    for sp in subproblems(n, hq, hkv, w, r, head_offset):
        kv = sp.kv_view(hq, hkv)
        o_part, l_part = dense(
            sp.cut(q, sp.heads),
            sp.cut(k, kv),
            sp.cut(v, kv),
            sp.cut_mask(key_padding_mask),
            scale,
            is_causal,
            dropout_p,
        )
        sp.rows(out, sp.heads)[:] = sp.uncut(o_part, b).to(out.dtype)
        lse[:, sp.heads, sp.phase :: r][..., sp.start : sp.stop] = sp.uncut_lse(l_part, b).to(
            lse_dtype
        )
    return out, lse


def run_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    dense: DenseAttention,
    work_dtype: torch.dtype | None = None,
    head_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention on validated inputs with ``dense`` as the per-segment kernel.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, kv_heads, head_dim)``.
        v: shaped like ``k``.
        segment_lengths: the validated ``w_i``.
        dilation_rates: the validated ``r_i``.
        scale: softmax scale.
        is_causal: causal masking inside each segment.
        key_padding_mask: bool ``(batch, seq)`` in the internal form (True = a key that may be
            attended, what [`prepare_call`][dilated.core.functional.prepare_call] returns), or None.
        dropout_p: dropout on the probabilities.
        dense: the dense kernel.
        work_dtype: dtype the inputs are cast to before ``dense`` (default: keep them).
        head_offset: local head ``j`` takes the phase of head ``head_offset + j`` (see
            [`subproblems`][dilated.core.branches.subproblems]).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, seq, heads, head_dim)`` in the dtype of ``q``, ``lse``
        ``(batch, heads, seq)`` float32 (float64 for float64 inputs).
    """
    lse_dtype = compute_dtype(q.dtype)
    out_dtype = q.dtype
    if work_dtype is not None:
        q, k, v = q.to(work_dtype), k.to(work_dtype), v.to(work_dtype)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        o, lse = _one_branch(
            q,
            k,
            v,
            w,
            r,
            scale,
            is_causal,
            key_padding_mask,
            dropout_p,
            dense,
            lse_dtype,
            head_offset,
        )
        outs.append(o.to(lse_dtype))
        lses.append(lse)
    out, lse = merge_attention(outs, lses)
    return out.to(out_dtype), lse
