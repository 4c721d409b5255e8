"""Frozen, validated configuration dataclasses shared by every ``dilated`` package.

Each config checks itself in ``__post_init__`` and raises `ValueError` naming the field,
the value and the rule (a `TypeError` for a wrong kind of object, e.g. a string where a
bool is expected). Lists given for ``segment_lengths``/``dilation_rates`` are stored as tuples
so that configs stay hashable and immutable.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dilated.core.checks import (
    check_bool,
    check_branches,
    check_dropout,
    check_positive_int,
    check_positive_number,
    check_scale,
)

__all__ = [
    "DEFAULT_SPARSITY_RATIO",
    "PATTERN_TYPES",
    "DilatedAttentionConfig",
    "DistributedConfig",
    "MemoryPoolConfig",
    "MultiheadConfig",
    "RingAttentionConfig",
    "RingDistributedConfig",
    "SparseAttentionConfig",
    "SparsePatternConfig",
]


def _set(obj: object, name: str, value: Any) -> None:
    # Frozen dataclasses normalise their own fields (list -> tuple) through object.__setattr__.
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class DilatedAttentionConfig:
    """The attention pattern: one branch per ``(segment_length, dilation_rate)`` pair.

    Attributes:
        segment_lengths: ``w_i`` per branch (positive).
        dilation_rates: ``r_i`` per branch (positive, ``w_i % r_i == 0``).
        dropout: dropout on attention probabilities in training, in ``[0, 1)``.
        scale: softmax scale; None means ``head_dim ** -0.5``.
        is_causal: default causality of calls that do not say.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    dropout: float = 0.0
    scale: float | None = None
    is_causal: bool = False

    def __post_init__(self) -> None:
        ws, rs = check_branches(self.segment_lengths, self.dilation_rates)
        _set(self, "segment_lengths", ws)
        _set(self, "dilation_rates", rs)
        check_dropout("dropout", self.dropout)
        if self.scale is not None:
            check_scale(self.scale, 1)
        check_bool("is_causal", self.is_causal)

    @property
    def num_branches(self) -> int:
        """Number of ``(w, r)`` branches."""
        return len(self.segment_lengths)

    @property
    def max_segment_length(self) -> int:
        """The largest segment length ``max_i w_i``."""
        return max(self.segment_lengths)


@dataclass(frozen=True)
class MultiheadConfig:
    """Shape and initialisation of a multi-head dilated attention layer.

    Attributes:
        embed_dim: model width; a multiple of ``num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); None means ``num_heads``.
            ``num_heads`` must be a multiple of it.
        bias: biases in the q/k/v/out projections.
        layer_norm: MAGNETO sub-layer norm before the output projection.
        layer_norm_eps: epsilon of that norm.
        gamma_init: gain of the Xavier init of the v and out projections (MAGNETO).
        device, dtype: where and in what dtype parameters are created.
    """

    embed_dim: int
    num_heads: int
    num_kv_heads: int | None = None
    bias: bool = True
    layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    gamma_init: float = 1.0
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        check_bool("bias", self.bias)
        check_bool("layer_norm", self.layer_norm)
        check_positive_int("embed_dim", self.embed_dim)
        check_positive_int("num_heads", self.num_heads)
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None:
            check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads != 0:
                raise ValueError(
                    f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                    f"({self.num_kv_heads}) for grouped-query attention"
                )
        for name in ("layer_norm_eps", "gamma_init"):
            check_positive_number(name, getattr(self, name))
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        """Width of one head, ``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads, resolving None to ``num_heads``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclass(frozen=True)
class MemoryPoolConfig:
    """Bounds of a [`MemoryPool`][dilated.core.memory_pool.MemoryPool].

    Attributes:
        max_bytes: bytes the pool may keep while idle; beyond it the least recently used buffers
            are evicted.
        max_buffers_per_key: idle buffers kept per (shape, dtype, device).
        enabled: False makes every acquire a fresh allocation (for debugging).
    """

    max_bytes: int = 1 << 30
    max_buffers_per_key: int = 4
    enabled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int):
            raise ValueError(f"max_bytes must be a non-negative integer, got {self.max_bytes!r}")
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {self.max_bytes}")
        check_positive_int("max_buffers_per_key", self.max_buffers_per_key)
        check_bool("enabled", self.enabled)


@dataclass(frozen=True)
class RingAttentionConfig(DilatedAttentionConfig):
    """A dilated pattern computed over a sequence split across ranks.

    ``dilation_rates`` may be left out, which means rate 1 for every branch.

    Attributes:
        load_balance: how the sequence is split: ``"contiguous"`` shards, or ``"zigzag"`` /
            ``"striped"`` to even out causal work.
        overlap: deprecated and ignored. The ring strategy always posts the next key/value
            transfer before computing on the current block; ``overlap=False`` warns
            (``DeprecationWarning``) and changes nothing.
        checkpoint: recompute the attention in the backward pass instead of storing it.
    """

    # Left out (empty), every branch gets rate 1; the positional order of the parent still works.
    dilation_rates: tuple[int, ...] = ()
    load_balance: Literal["contiguous", "zigzag", "striped"] = "contiguous"
    overlap: bool = True
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dilation_rates, (tuple, list)) and len(self.dilation_rates) == 0:
            _set(self, "dilation_rates", (1,) * len(self.segment_lengths))
        super().__post_init__()
        check_bool("overlap", self.overlap)
        check_bool("checkpoint", self.checkpoint)
        if not self.overlap:
            warnings.warn(
                "RingAttentionConfig.overlap is deprecated and ignored: the ring strategy always "
                "overlaps the next key/value transfer with the current block's compute",
                DeprecationWarning,
                stacklevel=3,
            )
        if self.load_balance not in ("contiguous", "zigzag", "striped"):
            raise ValueError(
                "load_balance must be 'contiguous', 'zigzag' or 'striped', "
                f"got {self.load_balance!r}"
            )


@dataclass(frozen=True)
class DistributedConfig:
    """Process-group settings of sequence-parallel attention.

    Attributes:
        world_size: ranks expected in the group (None: read it from the group at run time).
        strategy: ``"ring"`` (rotating K/V blocks), ``"allgather"`` (LongNet's algorithm) or
            ``"ulysses"`` (all-to-all over heads).
        timeout_s: seconds a collective may wait before failing.
        backend: deprecated and ignored: no process group is ever created from this config (the
            layers use the group they are given, or the default one). A value other than None
            warns (``DeprecationWarning``); create the group with
            ``torch.distributed.init_process_group(backend=...)`` instead.
    """

    world_size: int | None = None
    strategy: Literal["ring", "allgather", "ulysses"] = "ring"
    timeout_s: float = 600.0
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.world_size is not None:
            check_positive_int("world_size", self.world_size)
        if self.strategy not in ("ring", "allgather", "ulysses"):
            raise ValueError(
                f"strategy must be 'ring', 'allgather' or 'ulysses', got {self.strategy!r}"
            )
        # Infinity too: it would overflow the process group's timedelta at the first wait.
        check_positive_number("timeout_s", self.timeout_s, unit=" of seconds")
        if self.backend is not None:
            warnings.warn(
                "DistributedConfig.backend is deprecated and ignored: no process group is created "
                "from this config; pass backend= to torch.distributed.init_process_group instead",
                DeprecationWarning,
                stacklevel=3,
            )


#: The block layouts of [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig]; ``"custom"`` takes ``layout``.
PATTERN_TYPES = ("dense", "local_window", "global_local", "dilated_sparse", "custom")

#: The fraction of blocks kept by ``"local_window"``/``"global_local"`` when neither
#: ``sparsity_ratio`` nor ``local_window_size`` is given.
DEFAULT_SPARSITY_RATIO = 0.25

#: A custom block layout: one bool ``(nb, nb)`` tensor for every branch (cropped to each
#: branch's block count), one per branch, or a function of (query block, key block).
CustomLayout = torch.Tensor | Sequence[torch.Tensor] | Callable[[Any, Any], Any]


def _check_layout_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor (nb, nb), got {type(value).__name__}")
    if value.dim() != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
        raise ValueError(
            f"{name} must be a square (nb, nb) bool tensor, got shape {tuple(value.shape)}"
        )
    if value.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {value.dtype}")
    # A private CPU copy: the config stays immutable even if the caller edits their tensor.
    return value.detach().to("cpu").clone()


@dataclass(frozen=True)
class SparsePatternConfig:
    """A block layout that restricts every dense sub-problem of every dilated branch.

    Blocks are counted in rows of a branch's sub-problem (tokens when ``r = 1``): block ``a``
    holds rows ``a * block_size .. (a + 1) * block_size - 1`` of a segment's positions of one
    phase. Query block ``a`` may attend key block ``b`` when the layout says so (see the concepts
    page of the docs); [`resolve_layouts`][dilated.core.sparsity.resolve_layouts] builds each
    branch's layout and [`describe`][dilated.core.config.SparsePatternConfig.describe] prints it.

    Attributes:
        pattern_type: ``"dense"``, ``"local_window"`` (``|a - b| <= W``), ``"global_local"``
            (``a < G or b < G or |a - b| <= W``), ``"dilated_sparse"`` (``a == b`` or ``|a - b|``
            a power of two) or ``"custom"`` (``layout``).
        sparsity_ratio: for ``"local_window"``/``"global_local"``: the fraction of the
            ``nb_i * nb_i`` blocks to keep, in ``(0, 1]``; each branch takes the smallest window
            ``W`` that keeps at least that fraction. Exclusive with ``local_window_size``; with
            neither, ``DEFAULT_SPARSITY_RATIO`` (0.25).
        block_size: rows per block (positive).
        local_window_size: the window in rows, ``W = local_window_size // block_size`` blocks on
            each side, the same for every branch (``>= 0``).
        global_tokens: for ``"global_local"``: rows of global blocks,
            ``G = ceil(global_tokens / block_size)`` (``>= 1``; default one block).
        layout: for ``"custom"``: a bool tensor ``(nb, nb)`` for every branch (cropped to each
            branch's ``nb_i``, so at least the largest), a list with one per branch, or a
            function ``(a, b) -> bool`` of block numbers (called on broadcast long tensors
            first, element by element if that fails).
    """

    pattern_type: str = "local_window"
    sparsity_ratio: float | None = None
    block_size: int = 128
    local_window_size: int | None = None
    global_tokens: int | None = None
    layout: CustomLayout | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.pattern_type not in PATTERN_TYPES:
            raise ValueError(
                f"pattern_type must be one of {', '.join(map(repr, PATTERN_TYPES))}, "
                f"got {self.pattern_type!r}"
            )
        check_positive_int("block_size", self.block_size)
        windowed = self.pattern_type in ("local_window", "global_local")
        if self.sparsity_ratio is not None:
            if not windowed:
                raise ValueError(
                    "sparsity_ratio picks the window of 'local_window'/'global_local'; "
                    f"pattern_type {self.pattern_type!r} has none"
                )
            r = self.sparsity_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"sparsity_ratio must be a number in (0, 1], got {r!r}")
            if self.local_window_size is not None:
                raise ValueError(
                    "give either sparsity_ratio or local_window_size, not both: both set the window"
                )
        if self.local_window_size is not None:
            if not windowed:
                raise ValueError(
                    "local_window_size applies to 'local_window'/'global_local', "
                    f"not to pattern_type {self.pattern_type!r}"
                )
            _check_non_negative_int("local_window_size", self.local_window_size)
        if self.global_tokens is not None:
            if self.pattern_type != "global_local":
                raise ValueError(
                    "global_tokens applies to 'global_local', "
                    f"not to pattern_type {self.pattern_type!r}"
                )
            _check_non_negative_int("global_tokens", self.global_tokens)
            if self.global_tokens == 0:
                raise ValueError(
                    "global_tokens must be >= 1 for 'global_local' (use 'local_window' for none)"
                )
        if self.pattern_type == "custom":
            _set(self, "layout", _check_custom_layout(self.layout))
        elif self.layout is not None:
            raise ValueError(
                f"layout is only for pattern_type 'custom', got pattern_type {self.pattern_type!r}"
            )

    @property
    def window_blocks(self) -> int | None:
        """``W`` from ``local_window_size`` (None when the window comes from a ratio)."""
        if self.local_window_size is None:
            return None
        return self.local_window_size // self.block_size

    @property
    def global_blocks(self) -> int:
        """``G = ceil(global_tokens / block_size)`` (one block by default)."""
        if self.global_tokens is None:
            return 1
        return -(-self.global_tokens // self.block_size)

    @property
    def ratio(self) -> float | None:
        """The fraction that picks ``W``: ``sparsity_ratio``, the default, or None (fixed ``W``)."""
        if self.pattern_type not in ("local_window", "global_local"):
            return None
        if self.local_window_size is not None:
            return None
        return DEFAULT_SPARSITY_RATIO if self.sparsity_ratio is None else self.sparsity_ratio

    def describe(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> str:
        """One line per branch: rows, blocks ``nb``, window ``W``, global ``G`` and density."""
        from dilated.core.sparsity import describe_layouts, resolve_layouts

        return describe_layouts(self, resolve_layouts(self, segment_lengths, dilation_rates))


#: The name dilated-core used before dilated-sparse; the same class.
SparseAttentionConfig = SparsePatternConfig


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_custom_layout(layout: object) -> CustomLayout:
    if layout is None:
        raise ValueError(
            "pattern_type 'custom' needs layout: a bool (nb, nb) tensor, a list of them (one per "
            "branch) or a function (a, b) -> bool"
        )
    if isinstance(layout, torch.Tensor):
        return _check_layout_tensor("layout", layout)
    if isinstance(layout, (list, tuple)):
        if len(layout) == 0:
            raise ValueError(
                "layout must not be an empty list: give one (nb, nb) tensor per branch"
            )
        return tuple(_check_layout_tensor(f"layout[{i}]", t) for i, t in enumerate(layout))
    if callable(layout):
        return layout
    raise ValueError(
        "layout must be a bool (nb, nb) tensor, a list of them or a function (a, b) -> bool, "
        f"got {type(layout).__name__}"
    )


@dataclass(frozen=True)
class RingDistributedConfig:
    """Everything a distributed multi-head layer needs, composed from the parts above."""

    multihead_config: MultiheadConfig
    ring_config: RingAttentionConfig
    distributed_config: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("multihead_config", MultiheadConfig),
            ("ring_config", RingAttentionConfig),
            ("distributed_config", DistributedConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                )
