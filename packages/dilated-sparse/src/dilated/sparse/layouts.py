"""The layouts of a call and the key the custom op takes them by.

A custom op takes no Python objects, so the layout reaches ``dilated_sparse::attention`` as a
string that holds the layout itself ([`layout_key`][dilated.sparse.layouts.layout_key]), not a
reference to its config: the op's arguments, which autograd saves for the backward pass, are all
that pass needs, and equal layouts give equal strings in any process.
[`resolve`][dilated.sparse.layouts.resolve] turns a config and branches into the layouts and
their key, once per config content and branches.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dilated.core.caching import plan_cache
from dilated.core.checks import ArgumentTypeError, check_branches
from dilated.core.config import SparsePatternConfig
from dilated.core.sparsity import BranchLayout, block_count, resolve_layouts

__all__ = [
    "ResolvedLayouts",
    "branch_layouts",
    "check_sparse_config",
    "layout_key",
    "resolve",
]


def check_sparse_config(config: object) -> SparsePatternConfig:
    """Return ``config`` if it is a [`SparsePatternConfig`][dilated.core.config.SparsePatternConfig].

    Raises:
        ArgumentTypeError: anything else; the message names ``sparse_config``.
    """
    if not isinstance(config, SparsePatternConfig):
        raise ArgumentTypeError(
            f"sparse_config must be a SparsePatternConfig, got {type(config).__name__}"
        )
    return config


@dataclass(frozen=True)
class ResolvedLayouts:
    """A layout resolved for one branch list.

    Attributes:
        layouts: every branch's [`BranchLayout`][dilated.core.sparsity.BranchLayout].
        block_size: rows per block.
        key: [`layout_key`][dilated.sparse.layouts.layout_key] of them: what the custom op
            takes (it holds the tables themselves).
    """

    layouts: tuple[BranchLayout, ...]
    block_size: int
    key: str


#: The version of the key format; a key of another format is refused, never misread.
_KEY_PREFIX = "dilated-sparse-layout-v1"


def layout_key(layouts: Sequence[BranchLayout], block_size: int) -> str:
    """The string the custom op takes a layout by: it holds the layout's content.

    ``"dilated-sparse-layout-v1:<block_size>:<w>,<r>,<nb>;...:<tables>"``, the tables being every
    branch's bool ``(nb, nb)`` table, one byte a block, zlib-compressed and base64-encoded (a
    band or a structured layout compresses to a few bytes). Equal layouts give equal keys in any
    process, and a key never names another layout: the op's saved state (its arguments) is all
    its backward pass needs, however many other configs were made, freed or called since.
    """
    branches = ";".join(f"{lay.segment_length},{lay.dilation_rate},{lay.nb}" for lay in layouts)
    tables = torch.cat([lay.blocks.reshape(-1) for lay in layouts]).to(torch.bool)
    packed = base64.b64encode(zlib.compress(tables.numpy().tobytes())).decode("ascii")
    return f"{_KEY_PREFIX}:{block_size}:{branches}:{packed}"


@plan_cache("dilated.sparse.layouts.decode", maxsize=64, key="the layout key")
def _decode(key: str) -> ResolvedLayouts:
    """The layouts a [`layout_key`][dilated.sparse.layouts.layout_key] holds (cached: an
    evicted key is decoded again, never lost)."""
    try:
        prefix, block, branches, packed = key.split(":")
        if prefix != _KEY_PREFIX:
            raise ValueError(prefix)
        block_size = int(block)
        shapes = [tuple(int(x) for x in part.split(",")) for part in branches.split(";")]
        raw = zlib.decompress(base64.b64decode(packed, validate=True))
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if any(len(s) != 3 or s[2] != block_count(s[0], s[1], block_size) for s in shapes):
            raise ValueError(branches)
        if flat.numel() != sum(nb * nb for _, _, nb in shapes) or bool((flat > 1).any()):
            raise ValueError(packed)
    except (ValueError, zlib.error, binascii.Error) as exc:
        shown = key if len(key) <= 80 else key[:77] + "..."
        raise ValueError(
            f"layout_key must be a key made by dilated.sparse.functional.layout_key, got {shown!r}"
        ) from exc
    layouts, at = [], 0
    for w, r, nb in shapes:
        blocks = flat[at : at + nb * nb].reshape(nb, nb).to(torch.bool)
        layouts.append(BranchLayout(w, r, w // r, nb, None, None, blocks))
        at += nb * nb
    return ResolvedLayouts(tuple(layouts), block_size, key)


@dataclass(frozen=True)
class _Content:
    """A config by what determines its layouts: its fields, and its custom tables' bytes or its
    layout function (which the cache entry holds, so that it stays that very function)."""

    fields: tuple[object, ...]
    config: SparsePatternConfig = field(compare=False, hash=False)


def _content(config: SparsePatternConfig) -> _Content:
    custom = config.layout
    token: object = custom
    # A config holds private CPU copies of its tables.
    if isinstance(custom, torch.Tensor):
        token = (tuple(custom.shape), custom.numpy().tobytes())
    elif isinstance(custom, tuple):
        token = tuple((tuple(t.shape), t.numpy().tobytes()) for t in custom)
    fields = (
        config.pattern_type,
        config.sparsity_ratio,
        config.block_size,
        config.local_window_size,
        config.global_tokens,
        token,
    )
    return _Content(fields, config)


@plan_cache(
    "dilated.sparse.layouts.resolve",
    maxsize=64,
    key="the config's content (fields, custom tables' bytes or layout function) and the branches",
)
def _resolved(
    content: _Content, segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...]
) -> ResolvedLayouts:
    config = content.config
    layouts = resolve_layouts(config, segment_lengths, dilation_rates)
    return ResolvedLayouts(layouts, config.block_size, layout_key(layouts, config.block_size))


def resolve(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> ResolvedLayouts:
    """[`resolve_layouts`][dilated.core.sparsity.resolve_layouts] and its
    [`layout_key`][dilated.sparse.layouts.layout_key], cached by the config's content and
    the branches (equal configs share an entry; a config is frozen, so its layouts never change).

    Raises:
        ArgumentTypeError: ``config`` is not a ``SparsePatternConfig``.
        ValueError: bad branches, or a custom layout that does not fit them.
    """
    ws, rs = check_branches(segment_lengths, dilation_rates)
    content = _content(check_sparse_config(config))
    try:
        hash(content)
    except TypeError:  # a layout callable that defines == but no hash: resolved every call
        return _resolved.__wrapped__(content, ws, rs)
    return _resolved(content, ws, rs)


def branch_layouts(
    config: SparsePatternConfig, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[BranchLayout, ...]:
    """The layouts of [`resolve`][dilated.sparse.layouts.resolve]."""
    return resolve(config, segment_lengths, dilation_rates).layouts


def _layouts(
    key: str, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[tuple[BranchLayout, ...], int]:
    """The branch layouts and block size ``key`` holds, checked against the call's branches."""
    resolved = _decode(key)
    held = [(lay.segment_length, lay.dilation_rate) for lay in resolved.layouts]
    if held != list(zip(segment_lengths, dilation_rates)):
        raise ValueError(
            f"layout_key holds the layouts of the branches (w, r) = {held}, but the call has "
            f"segment_lengths={list(segment_lengths)}, dilation_rates={list(dilation_rates)}"
        )
    return resolved.layouts, resolved.block_size
