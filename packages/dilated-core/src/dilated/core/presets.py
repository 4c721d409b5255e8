"""Named segment/dilation choices for common context lengths.

Each preset doubles as a ``kind`` of the factory: ``create_multihead_dilated_attention("gpt3_style")``
fills ``segment_lengths``, ``dilation_rates``, ``embed_dim`` and ``num_heads`` from it (keywords
given by the caller win) and then picks the implementation as ``kind="auto"`` does.

Most presets keep ``w_i / r_i`` equal across branches, so that every branch costs the same:
each query attends ``w_i / r_i`` keys per branch whatever the branch's reach.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A documented configuration.

    Attributes:
        segment_lengths, dilation_rates: the branches.
        embed_dim, num_heads: suggested layer size (used by the multi-head factory).
        max_seq: the context length the branches were chosen for (the largest segment).
        description: why these values.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    embed_dim: int
    num_heads: int
    max_seq: int
    description: str


PRESETS: dict[str, Preset] = {
    "gpt3_style": Preset(
        (2048, 4096, 8192),
        (1, 2, 4),
        768,
        12,
        8192,
        "GPT-3 small width; 2K local window plus two dilated branches reaching 8K, "
        "2048 keys per branch.",
    ),
    "longnet_32k": Preset(
        (2048, 4096, 8192, 16384, 32768),
        (1, 2, 4, 8, 16),
        768,
        12,
        32768,
        "The segment lengths of the LongNet paper's base model (2K to 32K) with rates that divide "
        "them, 2048 keys per branch; the default of the layers and models built without branches.",
    ),
    "longnet_64k": Preset(
        (2048, 8192, 32768, 65536),
        (1, 4, 16, 32),
        768,
        12,
        65536,
        "64K context: 2048 keys per branch, dilation growing with the segment as in LongNet.",
    ),
    "longnet_1m": Preset(
        (4096, 16384, 65536, 262144, 1048576),
        (1, 4, 16, 64, 256),
        1024,
        16,
        1048576,
        "1M-token context: five branches of 4096 keys each, geometric in segment and rate "
        "(LongNet's schedule, with rates that divide their segments).",
    ),
    "efficient_2b": Preset(
        (2048, 4096, 8192, 16384),
        (1, 2, 4, 8),
        2048,
        16,
        16384,
        "Width and heads of a ~2B-parameter model with a 16K context, 2048 keys per branch.",
    ),
}

#: The preset whose branches and sizes fill the keywords left out by constructors that
#: dilated-attention-pytorch gave defaults to (``LongNetLM(num_tokens=...)``, the keyword form of
#: ``RingDistributedDilatedAttention``).
DEFAULT_PRESET = "longnet_32k"
