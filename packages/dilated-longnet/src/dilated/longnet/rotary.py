"""Rotary position embedding (RoPE) for q and k, with the xPos length-extrapolation option."""

from __future__ import annotations

import torch
from torch import nn

from dilated.core.caching import LastStep
from dilated.core.checks import check_positive_number

__all__ = ["RotaryEmbedding"]

_Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: The last one-token step's factors, shared by every layer's rotation.
_STEP_FACTORS: LastStep[tuple[object, ...], _Factors] = LastStep()


class RotaryEmbedding(nn.Module):
    """Rotate q and k by their absolute positions (RoFormer, arXiv 2104.09864).

    With ``xpos_scale_base`` set, q at position ``t`` is also scaled by ``zeta ** (t / base)`` and
    k by ``zeta ** (-t / base)`` (xPos, arXiv 2212.10554), so that scores decay with distance.
    Positions are absolute (not centred) so that a KV cache stays valid; in float32 the scale
    underflows past roughly ``30 * base`` positions, so keep xPos for contexts of that order.

    Args:
        head_dim: width of one head (even).
        base: RoPE frequency base, a finite positive number.
        xpos_scale_base: None for plain RoPE, else a finite positive number.

    Raises:
        ValueError: a ``head_dim`` that is not a positive even int; a ``base`` or
            ``xpos_scale_base`` that is not a finite positive number (``inf`` would make every
            frequency but the first 0, or every xPos scale 1: a silently degenerate rotation;
            a string such as ``"10000"`` is not read as a number).
    """

    inv_freq: torch.Tensor
    zeta: torch.Tensor
    sign: torch.Tensor

    def __init__(
        self, head_dim: int, base: float = 10000.0, xpos_scale_base: float | None = None
    ) -> None:
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rotary needs a positive even head_dim, got {head_dim!r}")
        base = check_positive_number("base", base)
        if xpos_scale_base is not None:
            xpos_scale_base = check_positive_number(
                "xpos_scale_base", xpos_scale_base, or_none=True
            )
        self.head_dim = head_dim
        self.base = base
        self.xpos_scale_base = xpos_scale_base
        # Per element, the two of a pair sharing theirs: the angles (and scales) then come out
        # interleaved like the elements they turn, with no per-call repeat.
        idx = torch.arange(0, head_dim, 2, dtype=torch.float64).repeat_interleave(2)
        self.register_buffer("inv_freq", (base ** (-idx / head_dim)).float(), persistent=False)
        self.register_buffer("zeta", ((idx / head_dim + 0.4) / 1.4).float(), persistent=False)
        # The sign of the partner's term: x1 cos - x2 sin, x2 cos + x1 sin.
        sign = torch.tensor([-1.0, 1.0]).repeat(head_dim // 2)
        self.register_buffer("sign", sign, persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: int | torch.Tensor = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``(batch, seq, heads, head_dim)`` and ``k`` ``(batch, seq, kv_heads,
        head_dim)`` whose first token sits at absolute position ``offset``: an int, or a 0-d
        integer tensor on the device of ``q`` (read there: no host synchronisation, the same
        angles); returns both in their input dtypes."""
        n = q.shape[1]
        if n == 1 and isinstance(offset, int):
            # An eager decoding step rotates one token at the same position in every layer:
            # its factors are worked out once (each is a few launches, and the step is bound by
            # its launches).
            key = (offset, q.device, self.inv_freq.dtype, self.head_dim, self.base,
                   self.xpos_scale_base)  # fmt: skip
            factors = _STEP_FACTORS.get_or_build(key, lambda: self._factors(q.device, n, offset))
        else:
            factors = self._factors(q.device, n, offset)
        q_cos, q_sin, k_cos, k_sin = factors
        return _rotate(q, q_cos, q_sin), _rotate(k, k_cos, k_sin)

    def _factors(self, device: torch.device, n: int, offset: int | torch.Tensor) -> _Factors:
        """``(cos, sin)`` of q then of k, ``(1, n, 1, head_dim)`` float32, ``sin`` signed for
        [`_rotate`][dilated.longnet.rotary._rotate]."""
        if isinstance(offset, torch.Tensor):
            steps = torch.arange(n, device=device, dtype=torch.float32)
            pos = offset.to(device=device, dtype=torch.float32) + steps
        else:
            pos = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq.to(device)[None, :]
        # Once for q and k: each is a launch.
        cos = angles.cos()[None, :, None, :]
        sin = (angles.sin() * self.sign.to(device))[None, :, None, :]
        if self.xpos_scale_base is None:
            return cos, sin, cos, sin
        power = pos[:, None] / self.xpos_scale_base
        scale = (self.zeta.to(device)[None, :] ** power)[None, :, None, :]
        # Both elements of a pair share the scale, so it folds into the rotation.
        return cos * scale, sin * scale, cos / scale, sin / scale

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, xpos_scale_base={self.xpos_scale_base}"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pair ``(x1, x2)`` of ``x`` to ``(x1 cos - x2 sin, x1 sin + x2 cos)`` in float32, given
    float32 ``cos`` and the signed ``sin`` (``-sin`` at ``x1``, ``sin`` at ``x2``) per element,
    interleaved like ``x``; returns the dtype of ``x``."""
    # Four launches (an eager decoding step is bound by them): the swap, and products that
    # promote a 16-bit x to float32 themselves.
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)
