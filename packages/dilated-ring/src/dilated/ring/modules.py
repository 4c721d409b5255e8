"""Modules of dilated-ring and their registry entries (``"ring"``, ``"ring_distributed"``).

Every module takes this rank's shard of the sequence and returns this rank's rows of the
whole-sequence result; see [`dilated.ring.functional.ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.config import (
    DilatedAttentionConfig,
    DistributedConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
)
from dilated.core.registry import Implementation
from dilated.ring.functional import group_rank_and_size, ring_dilated_attention
from dilated.ring.legacy import config_from_keywords

__all__ = [
    "DISTRIBUTED_IMPLEMENTATION",
    "IMPLEMENTATION",
    "RING_DISTRIBUTED_IMPLEMENTATION",
    "DistributedImprovedDilatedAttention",
    "DistributedImprovedMultiheadDilatedAttention",
    "DistributedLayer",
    "RingDilatedAttention",
    "RingDistributedDilatedAttention",
    "RingMultiheadDilatedAttention",
    "create_ring_distributed_attention",
]


class RingDilatedAttention(BaseDilatedAttention):
    """Sequence-parallel dilated attention over this rank's shard ``(batch, seq / P, heads, head_dim)``.

    Construct like [`DilatedAttention`][dilated.core.modules.DilatedAttention] (keywords or a
    [`DilatedAttentionConfig`][dilated.core.config.DilatedAttentionConfig] /
    [`RingAttentionConfig`][dilated.core.config.RingAttentionConfig]), plus ``group`` (None: the default process
    group, or a world of one when torch.distributed is not initialised) and ``load_balance``
    (taken from a ``RingAttentionConfig`` when one is given). Call as
    ``attn(q_shard, k_shard, v_shard, is_causal=False)``. ``strategy`` is ``"ring"`` (default),
    ``"allgather"`` or ``"ulysses"``; ``timeout_s`` bounds every wait of a call and
    ``check_finite`` is the NaN/Inf input check of every rank (see
    [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention]).
    """

    packs_sequences = False  # shards of one sequence: a packed batch is not split by rank

    default_strategy = "ring"

    def __init__(
        self,
        segment_lengths: Sequence[int] | DilatedAttentionConfig,
        dilation_rates: Sequence[int] | None = None,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        op: Any = None,
        *,
        is_causal: bool = False,
        group: dist.ProcessGroup | None = None,
        load_balance: str | None = None,
        strategy: str | None = None,
        timeout_s: float | None = None,
        check_finite: bool | None = None,
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
        self.group = group
        from_config = getattr(self.config, "load_balance", "contiguous")
        self.load_balance = from_config if load_balance is None else load_balance
        self.strategy = self.default_strategy if strategy is None else strategy
        self.timeout_s = timeout_s

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
        out = ring_dilated_attention(
            q,
            k,
            v,
            self.config.segment_lengths,
            self.config.dilation_rates,
            scale=self.config.scale,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            group=self.group,
            load_balance=self.load_balance,
            strategy=self.strategy,
            timeout_s=self.timeout_s,
            check_finite=self.check_finite,
        )
        assert isinstance(out, torch.Tensor)
        return out


class RingMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head ring dilated attention: inputs ``(batch, seq / P, embed_dim)`` per rank.

    The constructor of [`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention]
    plus the keywords ``group``, ``load_balance``, ``strategy`` and ``timeout_s`` of
    [`RingDilatedAttention`][dilated.ring.modules.RingDilatedAttention], handed to it. The
    projections and the sub-layer norm act token by token, so they run on the shard unchanged;
    only the attention communicates. Returns ``(out, None)``.
    """

    attention_class = RingDilatedAttention

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The inner attention's process group (None: the default one)."""
        return _ring_attention(self).group

    @property
    def load_balance(self) -> str:
        """The inner attention's split of the sequence over the ranks."""
        return _ring_attention(self).load_balance


def _ring_attention(layer: BaseMultiheadDilatedAttention) -> RingDilatedAttention:
    inner = layer.attention
    assert isinstance(inner, RingDilatedAttention)
    return inner


class DistributedImprovedDilatedAttention(RingDilatedAttention):
    """LongNet's distributed algorithm: each rank receives every phase-row block of K/V of its
    segment group at once (an all-gather inside the group) and sends key/value gradients back
    to their owners in the backward pass (a reduce-scatter). Same arguments as
    [`RingDilatedAttention`][dilated.ring.modules.RingDilatedAttention]; same results.
    """

    default_strategy = "allgather"


class DistributedImprovedMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head layer on [`DistributedImprovedDilatedAttention`][dilated.ring.modules.DistributedImprovedDilatedAttention]
    (shards in and out); its keywords ``group``, ``load_balance``, ``strategy`` and
    ``timeout_s`` are handed to it."""

    attention_class = DistributedImprovedDilatedAttention


class DistributedLayer(nn.Module):
    """A multi-head layer over this rank's shard, built from a
    [`RingDistributedConfig`][dilated.core.config.RingDistributedConfig]: what dilated-ring's
    [`RingDistributedDilatedAttention`][dilated.ring.modules.RingDistributedDilatedAttention]
    and dilated-sparse's ``BlockSparseRingDistributedDilatedAttention`` share.

    It builds ``multihead_class`` from ``config.multihead_config`` and the pattern of
    ``config.ring_config``, with the settings ``group``, ``timeout_s``
    (``distributed_config.timeout_s``), ``check_finite``, those a subclass reads from the config
    (``_config_settings``) and those it is given. At call time ``distributed_config.world_size``,
    when set, must equal the group's size, and ``ring_config.checkpoint`` recomputes the layer in
    the backward pass instead of storing its activations.

    Args:
        config: multi-head, ring and distributed settings.
        group: process group (None: the default one) or a loopback group.
        check_finite: NaN/Inf check of the attention inputs on every rank (None: the environment
            variable ``DILATED_CHECK_FINITE``, see
            [`resolve_check_finite`][dilated.core.checks.resolve_check_finite]).
        **settings: further settings of ``multihead_class``'s attention.

    Raises:
        ValueError: ``config`` is not a ``RingDistributedConfig``, or holds what the subclass
            does not support.
    """

    #: The multi-head layer built (a subclass names its own).
    multihead_class: ClassVar[type[BaseMultiheadDilatedAttention]]

    def __init__(
        self,
        config: RingDistributedConfig,
        group: Any = None,
        *,
        check_finite: bool | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if not isinstance(config, RingDistributedConfig):
            raise ValueError(f"config must be a RingDistributedConfig, got {type(config).__name__}")
        self.config = config
        self.group = group
        rc = config.ring_config
        attention = DilatedAttentionConfig(
            segment_lengths=rc.segment_lengths,
            dilation_rates=rc.dilation_rates,
            dropout=rc.dropout,
            scale=rc.scale,
            is_causal=rc.is_causal,
        )
        self.layer = self.multihead_class(
            config.multihead_config,
            attention,
            check_finite=check_finite,
            group=group,
            timeout_s=config.distributed_config.timeout_s,
            **self._config_settings(config),
            **settings,
        )

    def _config_settings(self, config: RingDistributedConfig) -> dict[str, Any]:
        """The attention settings ``config`` holds beyond the timeout; raises ``ValueError``
        for what this layer does not support."""
        return {}

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Attend over the sharded sequence; ``(batch, seq / P, embed_dim)`` in and out.

        Args:
            query, key, value: this rank's ``(batch, seq / P, embed_dim)``.
            is_causal: None uses ``ring_config.is_causal``.
            key_padding_mask: this rank's ``(batch, seq / P)``, True at the padding.

        Returns:
            ``(out, None)``, ``out`` this rank's ``(batch, seq / P, embed_dim)``.
        """
        expected = self.config.distributed_config.world_size
        if expected is not None:
            _, world = group_rank_and_size(self.group)
            if world != expected:
                raise ValueError(
                    f"distributed_config.world_size={expected} but the process group has {world} "
                    "rank(s)"
                )

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.layer(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask
            )[0]
            return out

        if self.config.ring_config.checkpoint and torch.is_grad_enabled():
            return checkpoint(run, query, key, value, use_reentrant=False), None
        return run(query, key, value), None


class RingDistributedDilatedAttention(DistributedLayer):
    """A distributed multi-head layer built from a [`RingDistributedConfig`][dilated.core.config.RingDistributedConfig]
    (see [`DistributedLayer`][dilated.ring.modules.DistributedLayer]).

    Inputs are this rank's ``(batch, seq / P, embed_dim)``; returns ``(out, None)``. With
    ``ring_config.checkpoint`` the layer is recomputed in the backward pass instead of storing
    its activations.

    The keyword form of dilated-attention-pytorch also works,
    ``RingDistributedDilatedAttention(embed_dim=768, num_heads=12, segment_lengths=[...],
    dilation_rates=[...], dropout=..., bias=..., layer_norm=..., layer_norm_eps=...,
    gamma_init=..., device=..., dtype=...)``; branches left out take the ``longnet_32k`` preset.
    Its other keywords are accepted with a ``DeprecationWarning``: ``ring_size`` is
    ``DistributedConfig(world_size=...)`` (checked against the group at call time),
    ``use_checkpointing``/``activation_checkpointing`` are ``RingAttentionConfig(checkpoint=...)``,
    and ``block_size``, ``enable_deepspeed``/``use_deepspeed``, ``zero_stage``, ``cpu_offload``,
    ``use_flash_attention``, ``use_tf32``, ``sequence_parallel`` and ``enable_monitoring`` have no
    effect. ``create_ring_distributed_attention(...)`` is the keyword form without them.

    Args:
        config: multi-head, ring and distributed settings; ``distributed_config.strategy`` is
            ``"ring"``, ``"allgather"`` or ``"ulysses"``; ``distributed_config.timeout_s`` bounds
            every wait of a call; ``distributed_config.world_size``, when set, must equal the
            size of the group at call time; ``ring_config.load_balance`` splits the sequence.
            None with ``embed_dim``/``num_heads`` keywords.
        group: process group (None: default).
        check_finite: NaN/Inf check of the attention inputs on every rank (None: the environment
            variable ``DILATED_CHECK_FINITE``, see
            [`resolve_check_finite`][dilated.core.checks.resolve_check_finite]).
        embed_dim, num_heads, segment_lengths, dilation_rates, **legacy: the keyword form.
    """

    multihead_class = RingMultiheadDilatedAttention

    def __init__(
        self,
        config: RingDistributedConfig | None = None,
        group: dist.ProcessGroup | None = None,
        *,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        check_finite: bool | None = None,
        **legacy: Any,
    ) -> None:
        if config is None:
            if embed_dim is None or num_heads is None:
                raise ValueError(
                    "pass a RingDistributedConfig, or embed_dim= and num_heads= (and the branches)"
                )
            config = config_from_keywords(
                embed_dim, num_heads, segment_lengths, dilation_rates, legacy
            )
        elif embed_dim is not None or num_heads is not None or legacy:
            raise ValueError("pass either a RingDistributedConfig or keywords, not both")
        super().__init__(config, group, check_finite=check_finite)

    def _config_settings(self, config: RingDistributedConfig) -> dict[str, Any]:
        return {
            "load_balance": config.ring_config.load_balance,
            "strategy": config.distributed_config.strategy,
        }


def create_ring_distributed_attention(
    embed_dim: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    strategy: str = "ring",
    load_balance: str = "contiguous",
    checkpoint: bool = False,
    timeout_s: float = 600.0,
    is_causal: bool = False,
    num_kv_heads: int | None = None,
    group: dist.ProcessGroup | None = None,
    check_finite: bool | None = None,
    **multihead: Any,
) -> RingDistributedDilatedAttention:
    """Build a [`RingDistributedDilatedAttention`][dilated.ring.modules.RingDistributedDilatedAttention] from keywords (configs are validated)."""
    config = RingDistributedConfig(
        multihead_config=MultiheadConfig(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **multihead
        ),
        ring_config=RingAttentionConfig(
            segment_lengths=segment_lengths,  # type: ignore[arg-type]  # the config checks it
            dilation_rates=dilation_rates,  # type: ignore[arg-type]
            is_causal=is_causal,
            load_balance=load_balance,  # type: ignore[arg-type]
            checkpoint=checkpoint,
        ),
        distributed_config=DistributedConfig(strategy=strategy, timeout_s=timeout_s),  # type: ignore[arg-type]
    )
    return RingDistributedDilatedAttention(config, group=group, check_finite=check_finite)


IMPLEMENTATION = Implementation(
    name="ring",
    attention=RingDilatedAttention,
    multihead=RingMultiheadDilatedAttention,
    package="dilated-ring",
    description="sequence-parallel ring over torch.distributed: phase rows of K/V rotate",
    priority=0,
    distributed=True,
)

DISTRIBUTED_IMPLEMENTATION = Implementation(
    name="distributed",
    attention=DistributedImprovedDilatedAttention,
    multihead=DistributedImprovedMultiheadDilatedAttention,
    package="dilated-ring",
    description="LongNet's algorithm: all-gather of K/V phase rows per segment group",
    priority=0,
    distributed=True,
)

RING_DISTRIBUTED_IMPLEMENTATION = Implementation(
    name="ring_distributed",
    attention=RingDilatedAttention,
    multihead=RingMultiheadDilatedAttention,
    package="dilated-ring",
    description="ring/allgather/ulysses with load balancing and checkpointing (RingDistributedConfig)",
    priority=0,
    distributed=True,
)
