"""Base modules that every dilated-attention implementation subclasses.

[`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention] owns the config, the call signature and the dropout/causality
defaults; a subclass implements only ``BaseDilatedAttention._attention``.
[`BaseMultiheadDilatedAttention`][dilated.core.base.BaseMultiheadDilatedAttention] owns the projections, the MAGNETO sub-layer norm and the
initialisation; a subclass names its inner ``attention_class``, whose settings (``group=``,
``sparse_config=``...) are keywords of the multi-head constructor, handed to it when built.
"""

from __future__ import annotations

import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from dilated.core.checks import (
    ArgumentTypeError,
    check_bool,
    check_cu_seqlens,
    check_optional_bool,
)
from dilated.core.config import DilatedAttentionConfig, MultiheadConfig
from dilated.core.packed import packed_calls

__all__ = ["BaseDilatedAttention", "BaseMultiheadDilatedAttention", "attention_settings"]


def _warn_op(op: Any) -> None:
    if op is not None:
        warnings.warn(
            "op= selected an xformers operator in dilated-attention-pytorch 0.2.0 and is ignored "
            "here; choose an implementation with create_dilated_attention(kind=...) instead",
            DeprecationWarning,
            stacklevel=3,
        )


class BaseDilatedAttention(nn.Module, ABC):
    """Dilated attention over ``(batch, seq, heads, head_dim)`` inputs.

    Construct from keywords, ``Cls(segment_lengths, dilation_rates, softmax_scale=None,
    attention_dropout=0.0)`` as in dilated-attention-pytorch, or from a config, ``Cls(config)``.
    Keyword-only ``is_causal`` (default causality) and ``check_finite`` (NaN/Inf input check:
    None follows the environment variable ``DILATED_CHECK_FINITE``, see
    [`resolve_check_finite`][dilated.core.checks.resolve_check_finite]) extend the original.

    Attributes:
        config: the validated [`DilatedAttentionConfig`][dilated.core.config.DilatedAttentionConfig].
        check_finite: passed to every call of the functional op; a subclass reads it in
            `_attention`.
        computes_dilated_attention: True when the module computes exactly the dilated attention
            of its branches (what a KV cache of them reproduces); a subclass that computes
            another function of the same branches (a block-sparse layout) sets it False.
    """

    config: DilatedAttentionConfig
    check_finite: bool | None
    computes_dilated_attention: ClassVar[bool] = True

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
    ) -> None:
        super().__init__()
        _warn_op(op)
        self.check_finite = check_optional_bool("check_finite", check_finite)
        if isinstance(segment_lengths, DilatedAttentionConfig):
            if dilation_rates is not None:
                raise ValueError("pass either a DilatedAttentionConfig or dilation_rates, not both")
            self.config = segment_lengths
        else:
            if dilation_rates is None:
                raise ValueError("dilation_rates is required when segment_lengths is given")
            # Handed over as given: the config refuses sets, ints and None by name, where
            # tuple() would silently pair a set's hash order with the rates.
            self.config = DilatedAttentionConfig(
                segment_lengths=segment_lengths,  # type: ignore[arg-type]
                dilation_rates=dilation_rates,  # type: ignore[arg-type]
                dropout=attention_dropout,
                scale=softmax_scale,
                is_causal=is_causal,
            )

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        """Segment length of each branch."""
        return self.config.segment_lengths

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        """Dilation rate of each branch."""
        return self.config.dilation_rates

    #: Whether ``cu_seqlens`` (a packed batch) is taken; False where the sequence is sharded
    #: across ranks, so that a packed sequence's rows are not all on one rank.
    packs_sequences: ClassVar[bool] = True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            query: ``(batch, seq, heads, head_dim)``.
            key: ``(batch, seq, kv_heads, head_dim)``, ``heads % kv_heads == 0``.
            value: shaped like ``key``.
            is_causal: None uses ``config.is_causal``.
            key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
                ``-inf``) at the padding, which is ignored.
            cu_seqlens: a packed batch: ``(1, total, ...)`` inputs whose sequence ``i`` is rows
                ``cu_seqlens[i]:cu_seqlens[i + 1]``, each attended alone (see
                [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).

        Returns:
            ``(batch, seq, heads, head_dim)`` in the dtype of ``query``.

        Raises:
            ValueError: ``cu_seqlens`` on an implementation that shards the sequence across
                ranks, and what the functional op refuses.
        """
        # is_causal is checked by the functional op (a mask in this slot is named there), inside
        # the cross-rank agreement of distributed implementations.
        causal = self.config.is_causal if is_causal is None else is_causal
        dropout_p = self.config.dropout if self.training else 0.0
        if cu_seqlens is None:
            return self._attention(
                query, key, value, is_causal=causal, key_padding_mask=key_padding_mask,
                dropout_p=dropout_p,
            )  # fmt: skip
        if not self.packs_sequences:
            raise ValueError(
                f"{type(self).__name__} shards the sequence across ranks, so cu_seqlens (a packed "
                "batch) is not supported: pad the sequences to a batch and pass key_padding_mask"
            )
        return self._attention_packed(
            query, key, value, check_cu_seqlens(cu_seqlens, query), is_causal=causal,
            key_padding_mask=key_padding_mask, dropout_p=dropout_p,
        )  # fmt: skip

    def _attention_packed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bounds: Sequence[int],
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        """A packed batch (``bounds``: the checked ``cu_seqlens``): one
        [`_attention`][dilated.core.base.BaseDilatedAttention._attention] per sequence, by
        default; an implementation whose op takes the packed batch in one call overrides it."""
        parts = packed_calls(
            self._attention, q, k, v, bounds, key_padding_mask=key_padding_mask,
            is_causal=is_causal, dropout_p=dropout_p,
        )  # fmt: skip
        return torch.cat(parts, dim=1)

    @abstractmethod
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
        """Compute the attention with this implementation (inputs as in [`forward`][dilated.core.base.BaseDilatedAttention.forward])."""

    def dense_reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The function this module computes, by the dense float64 judge (O(seq^2) memory).

        ``dilated check`` compares every implementation with it; a subclass that computes
        another function of its branches overrides it. Inputs as in [`forward`][dilated.core.base.BaseDilatedAttention.forward]; returns
        float64 ``(out, lse)`` as [`dense_dilated_attention`][dilated.core.testing.dense_dilated_attention].
        """
        from dilated.core.testing import dense_dilated_attention

        c = self.config
        causal = c.is_causal if is_causal is None else is_causal
        return dense_dilated_attention(
            q, k, v, c.segment_lengths, c.dilation_rates, scale=c.scale, is_causal=causal,
            key_padding_mask=key_padding_mask,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}, "
            f"dropout={c.dropout}, scale={c.scale}, is_causal={c.is_causal}"
        )


def attention_settings(cls: type[BaseDilatedAttention]) -> tuple[str, ...]:
    """The settings of an attention class, in declaration order: its constructor's keyword-only
    parameters (and those of the base classes its ``**kwargs`` reach) but ``is_causal``, which
    the config holds. A multi-head layer with this ``attention_class`` takes them as keywords."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params) or klass is BaseDilatedAttention:
            break
    return tuple(n for n in names if n != "is_causal")


class BaseMultiheadDilatedAttention(nn.Module, ABC):
    """Multi-head dilated attention with MAGNETO initialisation and sub-layer norm.

    Keyword construction follows dilated-attention-pytorch 0.2.0 (note ``dilation_rates`` before
    ``segment_lengths``)::

        Cls(embed_dim, num_heads, dilation_rates, segment_lengths, dropout=0.0, bias=True,
            layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None)

    or from configs, ``Cls(MultiheadConfig(...), DilatedAttentionConfig(...))``. Extra keywords
    (``num_kv_heads``, ``softmax_scale``, ``is_causal``, ``check_finite``) extend the original.

    The inner attention is built in the constructor from ``attention_config``, ``check_finite``
    (see [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention]) and the settings of
    ``attention_class`` ([`attention_settings`][dilated.core.base.attention_settings]: ``group=``
    for the ring, ``sparse_config=`` for a block-sparse layer...), keywords of this constructor
    too (another keyword is a `TypeError` listing them). A subclass sets ``attention_class`` (or
    overrides ``_make_attention(config, **settings)``).

    Inputs are ``(batch, seq, embed_dim)``; [`forward`][dilated.core.base.BaseMultiheadDilatedAttention.forward] returns ``(out, None)``.

    Attributes:
        multihead_config, attention_config: the validated configs.
        attention: the inner [`BaseDilatedAttention`][dilated.core.base.BaseDilatedAttention].
    """

    multihead_config: MultiheadConfig
    attention_config: DilatedAttentionConfig
    #: The inner attention class (None where ``_make_attention`` is overridden instead).
    attention_class: ClassVar[type[BaseDilatedAttention] | None] = None
    #: Inputs are ``(batch, seq, embed_dim)``; ``torch.nn.TransformerEncoder``/``Decoder`` read
    #: this attribute of their layers' ``self_attn``.
    batch_first: bool = True

    def __init__(
        self,
        embed_dim: int | MultiheadConfig,
        num_heads: int | DilatedAttentionConfig | None = None,
        dilation_rates: Sequence[int] | None = None,
        segment_lengths: Sequence[int] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        op: Any = None,
        *,
        num_kv_heads: int | None = None,
        softmax_scale: float | None = None,
        is_causal: bool = False,
        check_finite: bool | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        _warn_op(op)
        check_optional_bool("check_finite", check_finite)
        # False: the hook of dilated-attention-pytorch 0.2.0, _make_attention(config).
        takes_settings = any(
            p.kind is p.VAR_KEYWORD
            for p in inspect.signature(self._make_attention).parameters.values()
        )
        cls = self.attention_class
        known = attention_settings(cls) if cls is not None and takes_settings else ()
        if unknown := sorted(set(settings) - set(known)):
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"the settings of its attention are {', '.join(known) or 'none'}"
            )
        if isinstance(embed_dim, MultiheadConfig):
            if not isinstance(num_heads, DilatedAttentionConfig):
                raise ValueError(
                    "with a MultiheadConfig, the second argument must be a DilatedAttentionConfig, "
                    f"got {type(num_heads).__name__}"
                )
            self.multihead_config, self.attention_config = embed_dim, num_heads
        else:
            if isinstance(num_heads, DilatedAttentionConfig) or num_heads is None:
                raise ValueError("num_heads must be an int when embed_dim is an int")
            if segment_lengths is None or dilation_rates is None:
                raise ValueError("segment_lengths and dilation_rates are required")
            self.multihead_config = MultiheadConfig(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                bias=bias,
                layer_norm=layer_norm,
                layer_norm_eps=layer_norm_eps,
                gamma_init=gamma_init,
                device=device,
                dtype=dtype,
            )
            self.attention_config = DilatedAttentionConfig(
                segment_lengths=segment_lengths,  # type: ignore[arg-type]
                dilation_rates=dilation_rates,  # type: ignore[arg-type]
                dropout=dropout,
                scale=softmax_scale,
                is_causal=is_causal,
            )
        mc = self.multihead_config
        factory: dict[str, Any] = {"device": mc.device, "dtype": mc.dtype}
        kv_dim = mc.kv_heads * mc.head_dim
        self.q_proj = nn.Linear(mc.embed_dim, mc.embed_dim, bias=mc.bias, **factory)
        self.k_proj = nn.Linear(mc.embed_dim, kv_dim, bias=mc.bias, **factory)
        self.v_proj = nn.Linear(mc.embed_dim, kv_dim, bias=mc.bias, **factory)
        self.norm: nn.Module | None = (
            nn.LayerNorm(mc.embed_dim, eps=mc.layer_norm_eps, **factory) if mc.layer_norm else None
        )
        self.out_proj = nn.Linear(mc.embed_dim, mc.embed_dim, bias=mc.bias, **factory)
        if takes_settings:
            self.attention = self._make_attention(
                self.attention_config, check_finite=check_finite, **settings
            )
        else:
            self.attention = self._make_attention(self.attention_config)
            if check_finite is not None:
                self.attention.check_finite = check_finite
        self._reset_parameters()

    @property
    def embed_dim(self) -> int:
        """Model width."""
        return self.multihead_config.embed_dim

    @property
    def num_heads(self) -> int:
        """Query heads."""
        return self.multihead_config.num_heads

    def _make_attention(
        self, config: DilatedAttentionConfig, **settings: Any
    ) -> BaseDilatedAttention:
        """Build the inner attention, ``attention_class(config, **settings)``; ``settings``
        are ``check_finite`` and the attention settings given to the constructor."""
        if self.attention_class is None:
            what = "sets no attention_class and overrides no _make_attention(config, **settings)"
            raise TypeError(f"{type(self).__name__} {what}")
        return self.attention_class(config, **settings)

    def _reset_parameters(self) -> None:
        # MAGNETO (arXiv 2210.06423): Xavier-normal q/k, and v/out scaled by gamma_init.
        gamma = self.multihead_config.gamma_init
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, gamma),
            (self.out_proj, gamma),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Project, attend, normalise and project back.

        Args:
            query: ``(batch, seq, embed_dim)``.
            key: ``(batch, seq, embed_dim)`` (same ``seq`` as ``query``).
            value: shaped like ``key``.
            is_causal: None uses ``attention_config.is_causal``.
            key_padding_mask: ``(batch, seq)``, PyTorch's convention: bool True (or float
                ``-inf``) at the padding, which is ignored.
            need_weights: must be False: the sparse weights are never materialised.
            attn_mask: must be None: express masks with ``is_causal``/``key_padding_mask``.
            cu_seqlens: a packed batch of sequences along ``seq`` of a batch of one, each
                attended alone (see [`check_cu_seqlens`][dilated.core.checks.check_cu_seqlens]).

        Returns:
            ``(out, None)`` with ``out`` ``(batch, seq, embed_dim)``.
        """
        if check_bool("need_weights", need_weights):
            raise ValueError(
                "need_weights=True is not supported: dilated attention weights are never materialised"
            )
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported; use is_causal and key_padding_mask (True = padding)"
            )
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have shape (batch, seq, embed_dim={self.embed_dim}), "
                    f"got {tuple(t.shape)}"
                )
        q, k, v = self.project_inputs(query, key, value)
        x = self.attention(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens
        )
        return self.project_output(x), None

    def project_inputs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projected heads the inner attention takes (no checks): ``query``
        ``(batch, seq, embed_dim)`` gives ``q`` ``(batch, seq, heads, head_dim)``, ``key`` and
        ``value`` ``(batch, seq_k, embed_dim)`` give ``(batch, seq_k, kv_heads, head_dim)``."""
        mc = self.multihead_config
        q = self.q_proj(query).view(*query.shape[:2], mc.num_heads, mc.head_dim)
        # Key/value keep their own (batch, seq): a mismatch with the query is named by the
        # functional op's checks, which a distributed implementation runs on every rank at once.
        k = self.k_proj(key).view(*key.shape[:2], mc.kv_heads, mc.head_dim)
        v = self.v_proj(value).view(*value.shape[:2], mc.kv_heads, mc.head_dim)
        return q, k, v

    def project_output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output ``(batch, seq, embed_dim)`` from the attention's ``x``
        ``(batch, seq, heads, head_dim)``: heads joined, sub-layer norm, output projection."""
        x = x.reshape(*x.shape[:2], self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        out: torch.Tensor = self.out_proj(x)
        return out
