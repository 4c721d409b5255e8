"""The modules of dilated-sparse, registered as the ``"block_sparse"`` implementation.

The names are those of dilated-attention-pytorch (``BlockSparseRing...``); the single-process
modules compute on one device (the distributed one splits the sequence over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.config import (
    CustomLayout,
    DilatedAttentionConfig,
    RingDistributedConfig,
    SparsePatternConfig,
)
from dilated.core.registry import Implementation
from dilated.core.testing import dense_block_sparse_attention
from dilated.ring.modules import DistributedLayer
from dilated.sparse.distributed import block_sparse_ring_dilated_attention
from dilated.sparse.functional import attention_by_key, check_sparse_config, resolve

__all__ = [
    "IMPLEMENTATION",
    "RING_IMPLEMENTATION",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "DistributedBlockSparseDilatedAttention",
    "DistributedBlockSparseMultiheadDilatedAttention",
    "create_block_sparse_multihead_attention",
    "sparse_pattern_config",
]


def sparse_pattern_config(
    sparse_config: SparsePatternConfig | None = None,
    *,
    pattern_type: str | None = None,
    sparsity_ratio: float | None = None,
    block_size: int | None = None,
    local_window_size: int | None = None,
    global_tokens: int | None = None,
    layout: CustomLayout | None = None,
) -> SparsePatternConfig:
    """``sparse_config`` itself, or a config built from the keywords given (the others keep
    [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig]'s defaults); not both."""
    given: dict[str, Any] = {
        name: value
        for name, value in (
            ("pattern_type", pattern_type),
            ("sparsity_ratio", sparsity_ratio),
            ("block_size", block_size),
            ("local_window_size", local_window_size),
            ("global_tokens", global_tokens),
            ("layout", layout),
        )
        if value is not None
    }
    if sparse_config is not None:
        check_sparse_config(sparse_config)
        if given:
            raise ValueError(
                f"pass either sparse_config or its fields ({', '.join(given)}), not both"
            )
        return sparse_config
    return SparsePatternConfig(**given)


class BlockSparseRingDilatedAttention(BaseDilatedAttention):
    """Block-sparse dilated attention over ``(batch, seq, heads, head_dim)`` inputs.

    Construct as any dilated-attention module (``segment_lengths, dilation_rates,
    softmax_scale=None, attention_dropout=0.0`` or a
    [`DilatedAttentionConfig`][dilated.core.config.DilatedAttentionConfig]) plus the layout:
    ``sparse_config=SparsePatternConfig(...)`` or its fields as keywords (``pattern_type``,
    ``sparsity_ratio``, ``block_size``, ``local_window_size``, ``global_tokens``, ``layout``).
    Computes [`block_sparse_dilated_attention`][dilated.sparse.block_sparse_dilated_attention].
    ``check_finite`` (keyword) is handed to every call (see
    [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention]).

    Attributes:
        sparse_config: the layout.
    """

    # Only the "dense" layout equals the plain dilated attention a KV cache reproduces.
    computes_dilated_attention = False

    def __init__(
        self,
        segment_lengths: Sequence[int] | DilatedAttentionConfig,
        dilation_rates: Sequence[int] | None = None,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        op: Any = None,
        *,
        is_causal: bool = False,
        check_finite: bool | None = None,
        sparse_config: SparsePatternConfig | None = None,
        pattern_type: str | None = None,
        sparsity_ratio: float | None = None,
        block_size: int | None = None,
        local_window_size: int | None = None,
        global_tokens: int | None = None,
        layout: CustomLayout | None = None,
    ) -> None:
        super().__init__(
            segment_lengths,
            dilation_rates,
            softmax_scale,
            attention_dropout,
            op,
            is_causal=is_causal,
            check_finite=check_finite,
        )
        self.sparse_config = sparse_pattern_config(
            sparse_config,
            pattern_type=pattern_type,
            sparsity_ratio=sparsity_ratio,
            block_size=block_size,
            local_window_size=local_window_size,
            global_tokens=global_tokens,
            layout=layout,
        )

    @property
    def sparse_config(self) -> SparsePatternConfig:
        """The layout; assigning a new [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig]
        validates it against the branches and takes effect at the next call."""
        return self._sparse_config

    @sparse_config.setter
    def sparse_config(self, config: SparsePatternConfig) -> None:
        # Resolve now: a custom layout that does not fit the branches fails here, not mid-forward.
        resolved = resolve(config, self.segment_lengths, self.dilation_rates)
        self._sparse_config = config
        # What the forward passes to the custom op: a string torch.compile takes as a constant,
        # holding the layout itself (see layout_key).
        self._layout_key = resolved.key

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        out = self._op(
            q,
            k,
            v,
            self.config.segment_lengths,
            self.config.dilation_rates,
            sparse_config=self.sparse_config,
            scale=self.config.scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            check_finite=self.check_finite,
        )
        assert isinstance(out, torch.Tensor)
        return out

    def _op(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The functional this module calls (the distributed subclass adds its group)."""
        kwargs.pop("sparse_config")  # self.sparse_config, known to the op by its key
        return attention_by_key(*args, layout_key=self._layout_key, **kwargs)

    def dense_reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block-sparse judge [`dense_block_sparse_attention`][dilated.core.testing.dense_block_sparse_attention]
        with this module's branches and layout (float64, O(seq^2) memory)."""
        c = self.config
        return dense_block_sparse_attention(
            q,
            k,
            v,
            c.segment_lengths,
            c.dilation_rates,
            sparse_config=self.sparse_config,
            scale=c.scale,
            is_causal=c.is_causal if is_causal is None else is_causal,
            key_padding_mask=key_padding_mask,
        )

    def describe(self) -> str:
        """Each branch's rows, blocks ``nb``, window ``W``, global blocks ``G`` and density."""
        return self.sparse_config.describe(self.segment_lengths, self.dilation_rates)

    def extra_repr(self) -> str:
        lines = self.describe().replace("\n", "\n  ")
        return f"{super().extra_repr()},\n  {lines}"


class BlockSparseRingMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head block-sparse dilated attention over ``(batch, seq, embed_dim)``.

    The constructor of [`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention]
    (``embed_dim, num_heads, dilation_rates, segment_lengths, dropout, ...`` or two configs) plus
    the layout keywords of [`BlockSparseRingDilatedAttention`][dilated.sparse.BlockSparseRingDilatedAttention]
    (``sparse_config=`` or its fields), handed to it. Returns ``(out, None)``.
    """

    attention_class = BlockSparseRingDilatedAttention

    @property
    def sparse_config(self) -> SparsePatternConfig:
        """The inner attention's layout (assigning one sets the inner module's)."""
        inner = self.attention
        assert isinstance(inner, BlockSparseRingDilatedAttention)
        return inner.sparse_config

    @sparse_config.setter
    def sparse_config(self, config: SparsePatternConfig) -> None:
        inner = self.attention
        assert isinstance(inner, BlockSparseRingDilatedAttention)
        inner.sparse_config = config

    def describe(self) -> str:
        """The inner attention's layout per branch (see
        [`SparsePatternConfig.describe`][dilated.core.config.SparsePatternConfig.describe])."""
        return self.sparse_config.describe(
            self.attention_config.segment_lengths, self.attention_config.dilation_rates
        )


class DistributedBlockSparseDilatedAttention(BlockSparseRingDilatedAttention):
    """[`BlockSparseRingDilatedAttention`][dilated.sparse.BlockSparseRingDilatedAttention] over
    a sequence in contiguous shards across the ranks of ``group``: call it with this rank's
    ``(batch, seq / P, heads, head_dim)`` shards (see
    [`block_sparse_ring_dilated_attention`][dilated.sparse.distributed.block_sparse_ring_dilated_attention]).

    Extra keywords: ``group`` (a process group, None for the default one, or a
    [`LoopbackGroup`][dilated.ring.loopback.LoopbackGroup]) and ``timeout_s``.
    """

    packs_sequences = False  # shards of one sequence: a packed batch is not split by rank

    def __init__(
        self, *args: Any, group: Any = None, timeout_s: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.timeout_s = timeout_s

    def _op(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return block_sparse_ring_dilated_attention(
            *args, group=self.group, timeout_s=self.timeout_s, **kwargs
        )


class DistributedBlockSparseMultiheadDilatedAttention(BlockSparseRingMultiheadDilatedAttention):
    """The multi-head layer of [`DistributedBlockSparseDilatedAttention`][dilated.sparse.DistributedBlockSparseDilatedAttention]:
    ``(batch, seq / P, embed_dim)`` per rank (the projections act token by token on the shard).
    Extra keywords ``group`` and ``timeout_s``, handed to it with the layout."""

    attention_class = DistributedBlockSparseDilatedAttention

    @property
    def group(self) -> Any:
        """The inner attention's process group (None: the default one) or loopback group."""
        return self._sharded().group

    @property
    def timeout_s(self) -> float | None:
        """The inner attention's bound on every wait, in seconds."""
        return self._sharded().timeout_s

    def _sharded(self) -> DistributedBlockSparseDilatedAttention:
        inner = self.attention
        assert isinstance(inner, DistributedBlockSparseDilatedAttention)
        return inner


class BlockSparseRingDistributedDilatedAttention(DistributedLayer):
    """A distributed multi-head block-sparse layer built from a
    [`RingDistributedConfig`][dilated.core.config.RingDistributedConfig], like dilated-ring's
    ``RingDistributedDilatedAttention`` (both are a [`DistributedLayer`][dilated.ring.modules.DistributedLayer]),
    plus the layout.

    Inputs are this rank's ``(batch, seq / P, embed_dim)`` (contiguous shards); returns
    ``(out, None)``. ``ring_config.load_balance`` must be ``"contiguous"`` and
    ``distributed_config.strategy`` is ignored (only the needed key/value rows travel, see
    [`block_sparse_ring_dilated_attention`][dilated.sparse.distributed.block_sparse_ring_dilated_attention]);
    ``distributed_config.timeout_s`` bounds every wait, ``ring_config.checkpoint`` recomputes
    the layer in the backward pass, ``distributed_config.world_size`` (when set) must equal the
    group's size.

    Args:
        config: multi-head, ring and distributed settings.
        group: process group (None: default) or a loopback group.
        sparse_config: the layout (or its fields as keywords, see
            [`BlockSparseRingDilatedAttention`][dilated.sparse.BlockSparseRingDilatedAttention]).
        check_finite: NaN/Inf check of the attention inputs on every rank (None: the environment
            variable ``DILATED_CHECK_FINITE``, see
            [`resolve_check_finite`][dilated.core.checks.resolve_check_finite]).
    """

    multihead_class = DistributedBlockSparseMultiheadDilatedAttention

    def __init__(
        self,
        config: RingDistributedConfig,
        group: Any = None,
        *,
        sparse_config: SparsePatternConfig | None = None,
        check_finite: bool | None = None,
        **sparse_fields: Any,
    ) -> None:
        layout = sparse_pattern_config(sparse_config, **sparse_fields)
        super().__init__(config, group, check_finite=check_finite, sparse_config=layout)

    def _config_settings(self, config: RingDistributedConfig) -> dict[str, Any]:
        if config.ring_config.load_balance != "contiguous":
            raise ValueError(
                "ring_config.load_balance must be 'contiguous' for block-sparse attention over "
                f"ranks, got {config.ring_config.load_balance!r}"
            )
        return {}


def create_block_sparse_multihead_attention(
    embed_dim: int,
    num_heads: int,
    sparsity_ratio: float | None = None,
    pattern_type: str = "local_window",
    *,
    segment_lengths: Sequence[int] = (2048, 4096, 8192),
    dilation_rates: Sequence[int] = (1, 2, 4),
    **kwargs: Any,
) -> BlockSparseRingMultiheadDilatedAttention:
    """The factory of dilated-attention-pytorch: a multi-head block-sparse layer.

    Args:
        embed_dim, num_heads: layer size.
        sparsity_ratio: fraction of each branch's blocks to keep (picks ``W``); None keeps the
            config's default for windowed layouts.
        pattern_type: one of the layouts of
            [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig].
        segment_lengths, dilation_rates: the branches (default: the ``gpt3_style`` preset).
        **kwargs: other keywords of
            [`BlockSparseRingMultiheadDilatedAttention`][dilated.sparse.BlockSparseRingMultiheadDilatedAttention]
            (``block_size``, ``dropout``, ``num_kv_heads``, ``device``, ...).
    """
    return BlockSparseRingMultiheadDilatedAttention(
        embed_dim,
        num_heads,
        list(dilation_rates),
        list(segment_lengths),
        pattern_type=pattern_type,
        sparsity_ratio=sparsity_ratio,
        **kwargs,
    )


def _available_engines() -> list[str]:
    return ["cudnn tiles" if torch.cuda.is_available() else "pytorch tiles"]


IMPLEMENTATION = Implementation(
    name="block_sparse",
    attention=BlockSparseRingDilatedAttention,
    multihead=BlockSparseRingMultiheadDilatedAttention,
    package="dilated-sparse",
    description="block-sparse layouts (local window, global+local, log-sparse, custom), exact",
    # Never chosen by "auto": it computes another function unless the layout is dense.
    priority=-100,
    backends=_available_engines,
)

RING_IMPLEMENTATION = Implementation(
    name="block_sparse_ring",
    attention=DistributedBlockSparseDilatedAttention,
    multihead=DistributedBlockSparseMultiheadDilatedAttention,
    package="dilated-sparse",
    description="block-sparse layouts over contiguous shards: only the needed key blocks travel",
    priority=-100,
    distributed=True,
    backends=_available_engines,
)
