"""What a dense engine is asked: one batch of sub-problems, described by a hashable spec.

A spec holds only what decides whether an engine can run a call (device, dtype, head sizes,
causal, key mask, dropout, pass), not the lengths, so that the choice made for one spec is
cached and reused at every sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Engine", "SubproblemSpec"]


@dataclass(frozen=True, slots=True)
class SubproblemSpec:
    """The properties of a sub-problem call that decide which engines can run it.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        device_index: CUDA device index (0 elsewhere).
        dtype: dtype of ``q``, ``k`` and ``v``.
        head_dim: last dimension of ``q`` and ``k``.
        heads: query heads.
        kv_heads: key/value heads (``heads % kv_heads == 0``).
        empty: no query row or no key row.
        equal_rows: as many key rows as query rows.
        is_causal: top-left aligned causal mask.
        key_mask: a boolean key mask is given.
        dropout: ``dropout_p > 0``.
        backward: the gradient pass (``False``: the forward pass).
    """

    device_type: str
    device_index: int
    dtype: torch.dtype
    head_dim: int
    heads: int
    kv_heads: int
    empty: bool
    equal_rows: bool
    is_causal: bool
    key_mask: bool
    dropout: bool
    backward: bool

    @classmethod
    def of(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        is_causal: bool,
        key_mask: torch.Tensor | None,
        dropout_p: float,
        backward: bool = False,
    ) -> SubproblemSpec:
        """The spec of a call on ``q`` ``(batch, rows_q, heads, head_dim)`` and ``k``
        ``(batch, rows_k, kv_heads, head_dim)``."""
        device = q.device
        rows_q, rows_k = q.shape[1], k.shape[1]
        return cls(
            device.type,
            device.index or 0,
            q.dtype,
            q.shape[-1],
            q.shape[2],
            k.shape[2],
            rows_q == 0 or rows_k == 0 or q.shape[0] == 0,
            rows_q == rows_k,
            bool(is_causal),
            key_mask is not None,
            dropout_p > 0.0,
            backward,
        )


class Engine(Protocol):
    """A dense attention kernel behind the shared sub-problem primitive: one module each in
    [`dilated.kernels.engines`][dilated.kernels.engines].

    Every engine computes the same function: attention of ``q`` ``(batch, rows_q, heads,
    head_dim)`` over ``k``/``v`` ``(batch, rows_k, kv_heads, head_dim)`` (any strides with a
    unit stride on ``head_dim``), returning ``out`` in the dtype of ``q`` and the float32 LSE
    ``(batch, heads, rows_q)``; and its backward from the FINAL merged ``out`` and ``lse``.
    """

    #: The name ``engine=`` and the docs use.
    NAME: str
    #: Whether the engine builds a plan per new shape (a one-time cost of tens of ms).
    PLANS_PER_SHAPE: bool
    #: Whether the engine only backs up the others (chosen when no other takes the call).
    FALLBACK: bool
    #: Whether each call pays a host path of hundreds of microseconds (a Python wrapper, or
    #: plain PyTorch operations): ``"auto"`` then sends small calls to a lighter engine.
    HEAVY_HOST_PATH: bool

    def available(self, device: torch.device) -> bool:
        """Whether the engine can run at all on ``device`` (installed, right hardware)."""
        ...

    def unsupported_reason(self, spec: SubproblemSpec) -> str | None:
        """Why the engine cannot run a call of ``spec``, or None when it can."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        is_causal: bool,
        key_mask: torch.Tensor | None,
        dropout_p: float,
        dropout_seed: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of a supported call."""
        ...

    def backward(
        self,
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        is_causal: bool,
        key_mask: torch.Tensor | None,
        dropout_p: float,
        dropout_seed: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` of a supported call given the final merged ``out`` and ``lse``."""
        ...
