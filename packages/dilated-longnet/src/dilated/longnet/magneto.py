"""MAGNETO / DeepNet initialisation gain from the layer counts.

MAGNETO (Wang et al., "Foundation Transformers", arXiv 2210.06423, the initialisation section
derived from DeepNet, arXiv 2203.00555) scales the Xavier init of the value, output and
feed-forward projections by ``gamma``, which depends only on the depth:

- encoder-only with ``N`` layers: ``gamma = sqrt(log(2N))``;
- decoder-only with ``M`` layers: ``gamma = sqrt(log(2M))``;
- encoder-decoder: encoder ``gamma = sqrt(log(3M) * log(2N) / 3)``, decoder
  ``gamma = sqrt(log(3M))``.
"""

from __future__ import annotations

import math

from dilated.core.checks import check_positive_int

__all__ = ["magneto_gain"]


def magneto_gain(
    num_encoder_layers: int = 0, num_decoder_layers: int = 0, *, part: str = "auto"
) -> float:
    """The MAGNETO init gain ``gamma`` for one stack of a model.

    Args:
        num_encoder_layers: ``N`` (0 for a decoder-only model).
        num_decoder_layers: ``M`` (0 for an encoder-only model).
        part: ``"encoder"`` or ``"decoder"``: which stack of an encoder-decoder model; ``"auto"``
            is only valid when exactly one of the counts is non-zero.

    Returns:
        ``gamma`` as a Python float (>= ``sqrt(log 2)``).
    """
    for name, value in (
        ("num_encoder_layers", num_encoder_layers),
        ("num_decoder_layers", num_decoder_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    n, m = num_encoder_layers, num_decoder_layers
    if n == 0 and m == 0:
        raise ValueError("at least one of num_encoder_layers and num_decoder_layers must be > 0")
    if part not in ("auto", "encoder", "decoder"):
        raise ValueError(f"part must be 'auto', 'encoder' or 'decoder', got {part!r}")
    if m == 0:
        if part == "decoder":
            raise ValueError("part='decoder' needs num_decoder_layers > 0")
        return math.sqrt(math.log(2 * n))
    if n == 0:
        if part == "encoder":
            raise ValueError("part='encoder' needs num_encoder_layers > 0")
        return math.sqrt(math.log(2 * m))
    if part == "auto":
        raise ValueError("an encoder-decoder model needs part='encoder' or part='decoder'")
    check_positive_int("num_decoder_layers", m)
    if part == "encoder":
        return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
    return math.sqrt(math.log(3 * m))
