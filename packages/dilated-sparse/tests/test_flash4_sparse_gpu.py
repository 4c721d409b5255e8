"""The flash4 path on a GPU: flash-attn-4's block-sparse kernels against the float64 judge.

Skipped without CUDA, without flash-attn-4 or on a GPU the path does not take (it is built for
SM90: run on an H100/H200 with ``uv run pytest -q packages/dilated-sparse/tests -m gpu``).
the setting ``sparse_flash4=True`` for every test, so a call that fell back to the tiles path would raise
instead of passing unnoticed. Tolerance: [`tolerance`][dilated.core.testing.tolerance] of the
dtype (2e-2 relative to the largest reference entry for float16/bfloat16), output, LSE and
gradients.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.settings import use_settings
from dilated.core.testing import (
    assert_close_to_reference,
    check_on_random_inputs,
    dense_block_sparse_attention,
    make_inputs,
)
from dilated.sparse import block_sparse_dilated_attention, paths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _flash4_only() -> Iterator[None]:
    x = make_inputs(1, 256, 2, 64, dtype=torch.bfloat16, device="cuda")
    reason = paths.flash4_reason(x.q, x.k)
    if reason is not None:
        pytest.skip(f"the flash4 path does not run here: {reason}")
    with use_settings(sparse_flash4=True):
        yield


LAYOUTS = [
    # Blocks of 128 rows: the kernel's own (no layout lookup in the mask).
    SparsePatternConfig("local_window", local_window_size=256, block_size=128),
    # Smaller blocks: kernel blocks mixing allowed and disallowed layout blocks.
    SparsePatternConfig("global_local", sparsity_ratio=0.3, block_size=64, global_tokens=64),
    SparsePatternConfig("dilated_sparse", block_size=32),
    # Larger blocks (several kernel blocks each) and a custom table without its diagonal.
    SparsePatternConfig("local_window", sparsity_ratio=0.4, block_size=256),
    SparsePatternConfig("custom", block_size=128, layout=lambda a, b: (a + 2 * b) % 3 == 1),
]
IDS = ["local128", "global64", "dilated32", "local256", "custom128"]

# (batch, seq, heads, kv_heads, segment lengths, rates): whole segments (batch and segments in
# one call; rate 2 of 4 heads: a call per phase; rate 4: the phases as heads), a short last
# segment with GQA, GQA group 4 with a rate above the heads, group 3 (heads repeated), and
# rate 4 of 8 heads (the phases as heads, one call per head of a phase).
SHAPES = [
    (2, 2048, 4, 4, [512, 1024, 2048], [1, 2, 4]),
    (1, 2000, 4, 2, [512, 1024, 2048], [1, 2, 4]),
    (2, 1800, 8, 2, [512, 1024, 2048], [1, 2, 8]),
    (1, 1500, 6, 2, [512, 1024], [1, 2]),
    (1, 2048, 8, 8, [512, 1024, 2048], [1, 2, 4]),
]


# bfloat16 on every layout and shape; float16 (another compiled kernel, the same tables) on a few.
CASES = [
    *(
        pytest.param(cfg, torch.bfloat16, shape, id=f"{name}-bf16-{i}")
        for cfg, name in zip(LAYOUTS, IDS)
        for i, shape in enumerate(SHAPES)
    ),
    *(
        pytest.param(cfg, torch.float16, shape, id=f"{name}-fp16-{i}")
        for cfg, name in zip(LAYOUTS[:2], IDS[:2])
        for i, shape in enumerate(SHAPES[:2])
    ),
]


@pytest.mark.parametrize(("cfg", "dtype", "shape"), CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_judge_on_gpu(
    cfg: SparsePatternConfig,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, list[int], list[int]],
    causal: bool,
) -> None:
    b, n, h, hkv, ws, rs = shape
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        b, n, h, 64, ws, rs, kv_heads=hkv, is_causal=causal, dtype=dtype, device="cuda",
        seed=n + h, reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.parametrize("cfg", LAYOUTS[:3], ids=IDS[:3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_key_padding_on_gpu(
    cfg: SparsePatternConfig, causal: bool, shape: tuple[int, int, int, int, list[int], list[int]]
) -> None:
    # Padding refines the cached tables on the device and adds the key mask to the mask_mod.
    b, n, h, hkv, ws, rs = shape
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        b, n, h, 128, ws, rs, kv_heads=hkv, is_causal=causal, padding=True,
        dtype=torch.bfloat16, device="cuda", seed=7,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_head_dims_on_gpu(head_dim: int) -> None:
    cfg = LAYOUTS[1]
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        1, 1024, 4, head_dim, [256, 512, 1024], [1, 2, 4], is_causal=True,
        dtype=torch.bfloat16, device="cuda",
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
def test_flash4_equals_the_tiles_at_size(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """64K tokens of LongNet-like branches (rates 1, 4, 16 of 16 heads: one call, four, one),
    against the tiles path (itself checked against the judge in test_sparse_gpu.py)."""
    x = make_inputs(1, 65536, 16, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    ws, rs = [4096, 16384, 65536], [1, 4, 16]
    cfg = SparsePatternConfig("local_window", sparsity_ratio=0.25, block_size=128)
    grad = torch.randn(x.q.shape, device="cuda", dtype=torch.bfloat16)
    results = {}
    for path in ("flash4", "tiles"):
        with use_settings(sparse_flash4=path == "flash4"):
            out, lse = block_sparse_dilated_attention(
                x.q, x.k, x.v, ws, rs, sparse_config=cfg, is_causal=causal, return_lse=True
            )
        results[path] = (out, lse, *torch.autograd.grad(out, (x.q, x.k, x.v), grad))
    for name, got, want in zip(
        ("out", "lse", "dq", "dk", "dv"), results["flash4"], results["tiles"]
    ):
        assert_close_to_reference(got.float(), want.float(), torch.bfloat16, name)


@pytest.mark.parametrize("cfg", LAYOUTS[:3], ids=IDS[:3])
@pytest.mark.parametrize(("causal", "padding"), [(False, False), (True, True)])
def test_the_sharded_op_on_gpu(
    monkeypatch: pytest.MonkeyPatch, cfg: SparsePatternConfig, causal: bool, padding: bool
) -> None:
    """The distributed op on 4 loopback ranks of one GPU, on the flash4 path: the branch of
    w=512 local to each 1024-token shard, w=2048 and w=4096 through the flash4 body; each
    rank's output and gradients are its rows of the float64 judge's."""
    from dilated.kernels import flash4_block_sparse
    from dilated.ring.loopback import LoopbackGroup, run_ranks
    from dilated.sparse.distributed import sparse_ring_passes

    # The ranks are threads of one process here: one compiles or launches a kernel at a time
    # (one process per rank in a real run).
    lock = threading.Lock()
    for name in ("forward", "backward"):
        real = getattr(flash4_block_sparse, name)

        def locked(*args: object, _real: Any = real, **kw: object) -> None:
            with lock:
                _real(*args, **kw)

        monkeypatch.setattr(flash4_block_sparse, name, locked)
    world, ws, rs = 4, [512, 2048, 4096], [1, 2, 4]
    x = make_inputs(2, 4096, 4, 64, kv_heads=2, dtype=torch.bfloat16, device="cuda",
                    seed=5, padding=padding)  # fmt: skip
    grad = torch.randn(x.q.shape, device="cuda", dtype=torch.bfloat16)
    size = 4096 // world
    mask = x.key_padding_mask

    def rank_fn(rank: int, group: LoopbackGroup) -> tuple[torch.Tensor, ...]:
        # CUDA autograd runs every backward of a device on one engine thread, where the
        # ranks' backward passes would wait for each other: both passes driven directly.
        rows = slice(rank * size, (rank + 1) * size)
        return sparse_ring_passes(
            x.q[:, rows], x.k[:, rows], x.v[:, rows], grad[:, rows], ws, rs, sparse_config=cfg,
            is_causal=causal, group=group, timeout_s=300.0,
            key_padding_mask=None if mask is None else mask[:, rows],
        )  # fmt: skip

    got = [torch.cat(parts, dim=1) for parts in zip(*run_ranks(rank_fn, world, timeout_s=600.0))]
    q, k, v = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    want, _ = dense_block_sparse_attention(
        q, k, v, ws, rs, sparse_config=cfg, is_causal=causal, key_padding_mask=mask
    )
    want.backward(grad.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (want, q.grad, k.grad, v.grad)):
        assert w is not None
        assert_close_to_reference(g.float(), w.float(), torch.bfloat16, name)
