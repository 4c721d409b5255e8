"""Test helpers every ``dilated`` package imports: the dense judge, inputs and tolerances.

[`dense_dilated_attention`][dilated.core.testing.dense_dilated_attention] builds the full boolean mask of the docs' Concepts page for each branch and
computes in float64 ([`dense_block_sparse_attention`][dilated.core.testing.dense_block_sparse_attention] adds the block layout of
dilated-sparse to each mask); it is O(seq^2) in memory and meant for tests only. Implementations are
compared with it through [`assert_close_to_reference`][dilated.core.testing.assert_close_to_reference], whose tolerances are those of the Concepts page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dilated.core.checks import check_key_padding_mask
from dilated.core.config import SparsePatternConfig
from dilated.core.sparsity import resolve_layouts

__all__ = [
    "AttentionInputs",
    "assert_close_to_reference",
    "assert_matches_reference",
    "branch_mask",
    "check_on_random_inputs",
    "dense_attention_from_masks",
    "dense_block_sparse_attention",
    "dense_dilated_attention",
    "make_inputs",
    "relative_error",
    "sparse_branch_mask",
    "tolerance",
]


def branch_mask(
    seq: int,
    heads: int,
    segment_length: int,
    dilation_rate: int,
    *,
    is_causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The mask ``M[j, t, u]`` (docs' Concepts page) of one branch: True where query ``t`` of head ``j`` may see key ``u``.

    Returns a bool tensor ``(heads, seq, seq)`` (before any key padding mask).
    """
    pos = torch.arange(seq, device=device)
    phase = torch.arange(heads, device=device) % dilation_rate  # (h,)
    takes_part = (pos[None, :] % dilation_rate) == phase[:, None]  # (h, n)
    same_segment = (pos[:, None] // segment_length) == (pos[None, :] // segment_length)  # (n, n)
    mask = takes_part[:, :, None] & takes_part[:, None, :] & same_segment[None]
    if is_causal:
        mask &= (pos[None, :] <= pos[:, None])[None]
    return mask


def sparse_branch_mask(
    seq: int,
    heads: int,
    segment_length: int,
    dilation_rate: int,
    blocks: torch.Tensor,
    block_size: int,
    *,
    is_causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rules 1-4 of block-sparse dilated attention: [`branch_mask`][dilated.core.testing.branch_mask] and the block layout.

    Query ``t`` may attend key ``u`` only if ``blocks[a(t), a(u)]``, where ``a(t)`` is the
    block of ``t``'s row in its sub-problem: ``((t mod w) div r) div block_size``. ``blocks`` is
    the branch's bool ``(nb, nb)`` table (``nb = ceil((w / r) / block_size)``).

    Returns a bool tensor ``(heads, seq, seq)`` (before any key padding mask).
    """
    mask = branch_mask(
        seq, heads, segment_length, dilation_rate, is_causal=is_causal, device=device
    )
    pos = torch.arange(seq, device=device)
    block = ((pos % segment_length) // dilation_rate) // block_size  # (n,)
    allowed = blocks.to(device=device, dtype=torch.bool)[block[:, None], block[None, :]]
    return mask & allowed[None]


def dense_attention_from_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: Sequence[torch.Tensor],
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax per mask ``M_i`` ``(heads, seq, seq)``, merged by eq. 10, in float64.

    Returns ``(out, lse)``: ``out`` ``(batch, seq, heads, head_dim)`` and ``lse``
    ``(batch, heads, seq)``, float64 and differentiable in q, k and v. Empty rows give 0 and
    ``-inf`` with finite gradients. ``key_padding_mask`` is public (PyTorch's convention: bool
    True or float ``-inf`` = ignored), read by the ops' own
    [`check_key_padding_mask`][dilated.core.checks.check_key_padding_mask].
    """
    keep = check_key_padding_mask(key_padding_mask, k)
    d = q.shape[-1]
    group = q.shape[2] // k.shape[2]
    qd = q.double().transpose(1, 2)  # (b, h, n, d)
    kd = k.double().repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.double().repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qd @ kd.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)  # (b, h, n, n)
    branch_outputs, branch_lses = [], []
    for mask in masks:
        m = mask[None]  # (1, h, n, n)
        if keep is not None:
            m = m & keep[:, None, None, :]
        empty = ~m.any(dim=-1, keepdim=True)  # (b, h, n, 1)
        # Rows with no allowed key are set to 0 before logsumexp and back to -inf after, so that
        # neither the value nor its gradient is NaN.
        masked = torch.where(m, s, torch.where(empty, 0.0, float("-inf")))
        lse = torch.logsumexp(masked, dim=-1, keepdim=True)
        probs = torch.where(m, torch.exp(masked - lse), 0.0)
        branch_outputs.append(probs @ vd)
        branch_lses.append(torch.where(empty, float("-inf"), lse).squeeze(-1))
    lses = torch.stack(branch_lses)  # (m, b, h, n)
    covered = torch.isfinite(lses).any(dim=0)  # (b, h, n)
    total = torch.logsumexp(torch.where(covered, lses, 0.0), dim=0)
    weights = torch.where(covered, torch.exp(lses - total), 0.0)
    total = torch.where(covered, total, float("-inf"))
    out = sum(wt[..., None] * o for wt, o in zip(weights, branch_outputs))
    assert isinstance(out, torch.Tensor)
    return out.transpose(1, 2), total


def dense_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention straight from the definition of the docs' Concepts page, in float64 with dense masks.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, kv_heads, head_dim)``.
        v: shaped like ``k``.
        segment_lengths: ``w_i`` of each branch.
        dilation_rates: ``r_i`` of each branch.
        scale: default ``head_dim ** -0.5``.
        is_causal: as in [`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention].
        key_padding_mask: as in [`dilated.core.dilated_attention`][dilated.core.functional.dilated_attention].

    Returns:
        ``(out, lse)`` in float64: ``out`` ``(batch, seq, heads, head_dim)``, ``lse``
        ``(batch, heads, seq)``. Differentiable with respect to q, k and v (through float64).
    """
    _, n, hq, _ = q.shape
    masks = [
        branch_mask(n, hq, w, r, is_causal=is_causal, device=q.device)
        for w, r in zip(segment_lengths, dilation_rates)
    ]
    return dense_attention_from_masks(
        q, k, v, masks, scale=scale, key_padding_mask=key_padding_mask
    )


def dense_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    sparse_config: SparsePatternConfig,
    scale: float | None = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse dilated attention straight from its definition (rules 1-4), in float64.

    Each branch's mask is [`sparse_branch_mask`][dilated.core.testing.sparse_branch_mask] with the branch's table from
    [`resolve_layouts`][dilated.core.sparsity.resolve_layouts]; with the ``"dense"`` layout
    this is exactly [`dense_dilated_attention`][dilated.core.testing.dense_dilated_attention]. Arguments and result as there.
    """
    _, n, hq, _ = q.shape
    layouts = resolve_layouts(sparse_config, segment_lengths, dilation_rates)
    masks = [
        sparse_branch_mask(
            n,
            hq,
            lay.segment_length,
            lay.dilation_rate,
            lay.blocks,
            sparse_config.block_size,
            is_causal=is_causal,
            device=q.device,
        )
        for lay in layouts
    ]
    return dense_attention_from_masks(
        q, k, v, masks, scale=scale, key_padding_mask=key_padding_mask
    )


@dataclass
class AttentionInputs:
    """Random inputs for one dilated-attention call (see [`make_inputs`][dilated.core.testing.make_inputs])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None


def make_inputs(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    *,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    padding: bool = False,
    requires_grad: bool = False,
    seed: int | None = None,
) -> AttentionInputs:
    """Draw q, k, v ``(batch, seq, heads|kv_heads, head_dim)`` from N(0, 1) and an optional mask.

    With ``padding``, each batch row keeps a random-length prefix of real tokens (at least one)
    and ``key_padding_mask`` is bool ``(batch, seq)`` in PyTorch's convention, True at the
    padded tail (the keys to ignore), ready for every public op; otherwise it is None.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    hkv = heads if kv_heads is None else kv_heads

    def draw(h: int) -> torch.Tensor:
        x = torch.randn(batch, seq, h, head_dim, generator=gen, dtype=torch.float32)
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    mask = None
    if padding:
        lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None, :] >= lengths[:, None]).to(device)
    return AttentionInputs(draw(heads), draw(hkv), draw(hkv), mask)


def tolerance(dtype: torch.dtype) -> float:
    """The bound of the docs' Concepts page on ``max|out - ref| / max|ref|``: 1e-4 for float32/64, 2e-2 for 16-bit."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.1) -> float:
    """``max|actual - expected| / max(max|expected|, floor)`` in float64; NaN/Inf gives ``inf``.

    The floor keeps the measure meaningful where the true value is zero up to rounding (the
    gradient of q when each query sees one key, say), where a pure ratio would compare rounding
    noise with rounding noise. For the unit-variance inputs of [`make_inputs`][dilated.core.testing.make_inputs] it only acts
    on tensors whose largest entry is under 0.1, and there the bound becomes absolute.
    """
    a, e = actual.double(), expected.double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(e.abs().max().item(), floor)
    return (a - e).abs().max().item() / scale


def assert_close_to_reference(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "output"
) -> None:
    """Assert the relative bound (docs' Concepts page) for ``dtype`` holds between ``actual`` and ``expected``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err = relative_error(actual, expected)
    tol = tolerance(dtype)
    if not err < tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {tol:.0e} for {dtype}")


#: ``attention(q, k, v, segment_lengths, dilation_rates, *, is_causal, key_padding_mask)``
#: returning ``(out, lse)``, e.g. ``functools.partial(dilated_attention, return_lse=True)``.
AttentionWithLse = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def assert_matches_reference(
    attention: AttentionWithLse,
    inputs: AttentionInputs,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    seed: int = 0,
    reference: AttentionWithLse | None = None,
) -> None:
    """Assert that ``attention`` computes dilated attention (docs' Concepts page) on ``inputs``: output, LSE and q/k/v gradients.

    The judge is ``reference`` (default [`dense_dilated_attention`][dilated.core.testing.dense_dilated_attention]; e.g.
    ``functools.partial(dense_block_sparse_attention, sparse_config=...)``) on float64 copies of
    the inputs (which must require grad). Checked: output dtype and value, the LSE's ``-inf`` pattern and its finite
    values, and the gradients for one random output gradient, all within
    [`tolerance`][dilated.core.testing.tolerance] of the inputs' dtype.
    """
    q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.key_padding_mask
    dtype = q.dtype
    out, lse = attention(
        q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, key_padding_mask=mask
    )
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    judge = dense_dilated_attention if reference is None else reference
    ref, ref_lse = judge(
        ref_q,
        ref_k,
        ref_v,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        key_padding_mask=mask,
    )
    if out.dtype != dtype:
        raise AssertionError(f"output dtype {out.dtype} != input dtype {dtype}")
    assert_close_to_reference(out, ref, dtype)
    if not torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse).cpu()):
        raise AssertionError("lse: -inf at other positions than the reference's")
    finite = torch.isfinite(ref_lse)
    assert_close_to_reference(lse[finite], ref_lse[finite], dtype, "lse")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad = grad.to(device=out.device, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, dtype, name)


def check_on_random_inputs(
    attention: AttentionWithLse,
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    kv_heads: int | None = None,
    is_causal: bool = False,
    padding: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reference: AttentionWithLse | None = None,
) -> None:
    """[`assert_matches_reference`][dilated.core.testing.assert_matches_reference] on [`make_inputs`][dilated.core.testing.make_inputs] drawn with ``seed`` (grads on)."""
    inputs = make_inputs(
        batch,
        seq,
        heads,
        head_dim,
        kv_heads=kv_heads,
        dtype=dtype,
        device=device,
        padding=padding,
        requires_grad=True,
        seed=seed,
    )
    assert_matches_reference(
        attention,
        inputs,
        segment_lengths,
        dilation_rates,
        is_causal=is_causal,
        seed=seed,
        reference=reference,
    )
