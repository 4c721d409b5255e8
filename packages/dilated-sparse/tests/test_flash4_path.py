"""The flash4 path on the CPU: its calls, views, tables, regions and merge, with the
flash-attn-4 calls themselves run by the stand-in of ``fa4_emulator`` (``emulated_flash4``).

Kernel blocks of 16 rows stand in for flash-attn-4's 128, so that small problems have many
blocks; every layout block size then meets the three cases (smaller than, equal to, a multiple
of the kernel's). Under ``TRITON_INTERPRET=1`` (the merge is a Triton kernel).
"""

from __future__ import annotations

import functools
import itertools
import types

import fa4_emulator
import pytest
import torch

from dilated.core import SparsePatternConfig
from dilated.core.settings import use_settings
from dilated.core.sparsity import resolve_layouts
from dilated.core.testing import (
    check_on_random_inputs,
    dense_block_sparse_attention,
    make_inputs,
    sparse_branch_mask,
)
from dilated.kernels import flash4_block_sparse
from dilated.kernels.engines import flash4
from dilated.kernels.engines.spec import SubproblemSpec
from dilated.sparse import (
    block_sparse_dilated_attention,
    engine,
    flash4_path,
    flash4_workspace,
    paths,
)


@pytest.fixture(autouse=True)
def _small_kernel_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash4_block_sparse, "BLOCK", (16, 16))


LAYOUTS = [
    SparsePatternConfig("local_window", local_window_size=16, block_size=8),
    SparsePatternConfig("global_local", sparsity_ratio=0.3, block_size=16, global_tokens=16),
    SparsePatternConfig("dilated_sparse", block_size=8),
    SparsePatternConfig("local_window", sparsity_ratio=0.4, block_size=32),
    SparsePatternConfig("custom", block_size=8, layout=lambda a, b: (a + 2 * b) % 3 != 1),
]
IDS = ["local8", "global16", "dilated8", "local32", "custom8"]

# (batch, seq, heads, kv_heads, rates): whole segments (batch and segments one dimension), a
# short last segment (one call per batch row, a call per phase for the short segment), GQA
# with strided key/value heads, GQA that repeats them (group 3 against rate 2), rates above
# the head count, and phases that outnumber their heads (rate 4 of 8 heads: the phases are the
# heads of the call, one call per head of a phase).
SHAPES = [
    (2, 256, 4, 4, [1, 2, 4]),
    (2, 200, 4, 2, [1, 2, 4]),
    (1, 230, 6, 2, [1, 2, 8]),
    (1, 170, 4, 1, [1, 4, 8]),
    (2, 256, 8, 8, [1, 2, 4]),
]


def _covered(
    cfg: SparsePatternConfig, shape: tuple[int, int, int, int, list[int]], causal: bool,
    keep: torch.Tensor | None, backward: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """Per branch, bool ``(batch, heads, seq, seq)``: the pairs the path's calls compute."""
    b, n, h, hkv, rates = shape
    ws = [64, 128, 256][: len(rates)]
    layouts = resolve_layouts(cfg, ws, rates)
    q = torch.zeros(b, n, h, 1)
    k = torch.zeros(b, n, hkv, 1)
    if flash4_path._kv_group(h, hkv, layouts) is None:
        k = k.repeat_interleave(h // hkv, dim=2)
    prepared = flash4_path._prepared(layouts, cfg.block_size, causal, q, k, k, None)
    tables = prepared.tables(torch.device("cpu"))

    def index(size: tuple[int, ...], dim: int) -> torch.Tensor:
        shape4 = [1, 1, 1, 1]
        shape4[dim] = size[dim]
        return torch.arange(size[dim]).view(shape4).expand(*size).contiguous()

    kq, kk = (b, n, h, 1), tuple(k.shape)
    out = [torch.zeros(b, h, n, n, dtype=torch.bool) for _ in layouts]
    for call in prepared.plan.calls:
        lists, mask, aux = flash4_path.call_tables(call, tables[call.table], keep, backward)
        bq, hq, lq = call.batch[0], call.heads[0], call.rows
        ok = fa4_emulator.allowed_pairs(lists, mask, aux, bq, hq, lq, lq, backward=backward)
        qb, qt, qh = (flash4_path._view(index(kq, d), call, False)[..., 0] for d in (0, 1, 2))
        kb, kt, kh = (flash4_path._view(index(kk, d), call, True)[..., 0] for d in (0, 1, 2))
        group = hq // call.kv_heads[0]
        B, H, i, j = ok.nonzero(as_tuple=True)
        kv = H // group
        batch, head, t = qb[B, i, H], qh[B, i, H], qt[B, i, H]
        assert torch.equal(kb[B, j, kv], batch)
        # The key/value head of the key is the query head's (repeated ones included).
        expected = head if k.shape[2] == h else head // (h // hkv)
        assert torch.equal(kh[B, j, kv], expected)
        u = kt[B, j, kv]
        flat = ((batch * h + head) * n + t) * n + u
        target = out[call.run.branch].view(-1)
        assert flat.unique().numel() == flat.numel() and not target[flat].any(), "pair twice"
        target[flat] = True
    return out


@pytest.mark.parametrize("cfg", LAYOUTS, ids=IDS)
@pytest.mark.parametrize(
    ("shape", "padding"),
    [
        (SHAPES[0], False),
        (SHAPES[0], True),
        (SHAPES[1], True),
        (SHAPES[2], True),
        (SHAPES[3], False),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_the_calls_compute_the_judges_pairs(
    cfg: SparsePatternConfig, shape: tuple[int, int, int, int, list[int]], causal: bool,
    padding: bool,
) -> None:  # fmt: skip
    b, n, h, _, rates = shape
    keep = None
    if padding:
        lengths = torch.tensor([n - 37, n][:b])
        keep = torch.arange(n)[None, :] < lengths[:, None]
    ws = [64, 128, 256][: len(rates)]
    layouts = resolve_layouts(cfg, ws, rates)
    for backward in (False, True):
        got = _covered(cfg, shape, causal, keep, backward)
        for lay, pairs in zip(layouts, got):
            want = sparse_branch_mask(
                n, h, lay.segment_length, lay.dilation_rate, lay.blocks, cfg.block_size,
                is_causal=causal,
            )[None].expand(b, -1, -1, -1)  # fmt: skip
            if keep is not None:
                want = want & keep[:, None, None, :]
            assert torch.equal(pairs, want), (lay.segment_length, lay.dilation_rate, backward)


# Each layout meets every shape: two per causality, rotated.
JUDGED = [
    pytest.param(cfg, causal, SHAPES[(i + 2 * extra + causal) % 5], id=f"{name}-{causal}-{extra}")
    for i, (cfg, name) in enumerate(zip(LAYOUTS, IDS))
    for causal in (False, True)
    for extra in (0, 1)
]


@pytest.mark.usefixtures("emulated_flash4")
@pytest.mark.parametrize(("cfg", "causal", "shape"), JUDGED)
def test_matches_the_judge(
    cfg: SparsePatternConfig, causal: bool, shape: tuple[int, int, int, int, list[int]]
) -> None:
    b, n, h, hkv, rates = shape
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        b, n, h, 8, [64, 128, 256][: len(rates)], rates, kv_heads=hkv, is_causal=causal,
        padding=n % 2 == 0 or hkv < h, seed=n + h,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.usefixtures("emulated_flash4")
def test_half_precision_offsets() -> None:
    # Two-byte values: the workspace's byte offsets and the merge's pointers change.
    cfg = LAYOUTS[0]
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        2, 200, 4, 16, [64, 128], [1, 2], kv_heads=2, is_causal=True, padding=True,
        dtype=torch.float16,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip


@pytest.mark.usefixtures("emulated_flash4")
@pytest.mark.parametrize("budget", [1, 120_000], ids=["branch-each", "last-two-together"])
def test_the_backward_in_branch_groups(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """A gradient workspace over the budget: the branches go in groups (one each, or the last
    two, 77 + 38 kB, together), each group's sum added to the ones before; the judge's
    gradients."""
    monkeypatch.setattr(flash4_workspace, "BACKWARD_WORKSPACE_BYTES", budget)
    groups: list[list[tuple[int, int]]] = []
    real = flash4_workspace.branch_groups

    def spy(*args: object) -> list[flash4_workspace.BranchGroup]:
        got = real(*args)  # type: ignore[arg-type]
        groups.append([g.branches for g in got])
        return got

    monkeypatch.setattr(flash4_path, "branch_groups", spy)
    flash4_path._PREPARED.clear()  # the plans keep their groups
    cfg = LAYOUTS[0]
    check_on_random_inputs(
        functools.partial(block_sparse_dilated_attention, sparse_config=cfg, return_lse=True),
        2, 200, 4, 8, [64, 128, 256], [1, 2, 4], kv_heads=2, is_causal=True, padding=True,
        reference=functools.partial(dense_block_sparse_attention, sparse_config=cfg),
    )  # fmt: skip
    want = [(0, 1), (1, 2), (2, 3)] if budget == 1 else [(0, 1), (1, 3)]
    assert groups and all(g == want for g in groups), groups


def test_branch_groups_cover_every_call_once() -> None:
    cfg = LAYOUTS[2]
    layouts = resolve_layouts(cfg, [64, 128, 256], [1, 2, 4])
    q = torch.zeros(2, 230, 4, 8)
    plan = flash4_path._prepared(layouts, cfg.block_size, False, q, q, q, None).plan
    for budget in (1, 10_000, 40_000, 1 << 40):
        groups = flash4_workspace.branch_groups(plan, len(layouts), 8, 4, budget)
        assert [c for g in groups for c in g.calls] == list(plan.calls)
        assert groups[0].branches[0] == 0 and groups[-1].branches[1] == len(layouts)
        assert all(a.branches[1] == b.branches[0] for a, b in itertools.pairwise(groups))
        for g in groups:
            fits = g.layout_bytes(8, 4)["bwd_end"] <= budget
            assert fits or g.branches[1] - g.branches[0] == 1, (budget, g.branches)
            assert all(g.regions[0] <= c.region < g.regions[1] for c in g.calls)
    whole = flash4_workspace.branch_groups(plan, len(layouts), 8, 4, 1 << 40)
    assert [g.branches for g in whole] == [(0, 3)]


@pytest.mark.parametrize(
    ("free", "cached", "want"),
    [
        (70 << 30, 0, 16 << 30),  # a quarter of 80 GiB is 20 GiB: 16 as a power of two
        (14 << 30, 2 << 30, 8 << 30),  # half of the 16 GiB free, cache included
        (3 << 30, 0, 1 << 30),  # 1.5 GiB rounded down
    ],
)
def test_the_backward_budget_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, free: int, cached: int, want: int
) -> None:
    """By default the smaller of a quarter of the card and half of what is free (to the driver
    and in PyTorch's cache), as a power of two (a quarter while capturing); the setting overrides
    it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 + cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert flash4_workspace.backward_budget(torch.device("cuda", 0)) == want
    # Under a CUDA graph capture the graph's pool is not in the free figure: a quarter.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    props = types.SimpleNamespace(total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert flash4_workspace.backward_budget(torch.device("cuda", 0)) == 20 << 30
    monkeypatch.setattr(flash4_workspace, "BACKWARD_WORKSPACE_BYTES", 12345)
    assert flash4_workspace.backward_budget(torch.device("cuda", 0)) == 12345
    monkeypatch.setattr(flash4_workspace, "BACKWARD_WORKSPACE_BYTES", None)
    assert flash4_workspace.backward_budget(torch.device("cpu")) == 1 << 62


@pytest.mark.usefixtures("emulated_flash4")
def test_a_key_holds_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The op passes its layout key down: the second call finds the plan by it, builds no
    table, and both passes share it."""
    seen: list[object] = []
    real = flash4_path._prepared

    def spy(*args: object) -> flash4_path._Prepared:
        got = real(*args)  # type: ignore[arg-type]
        seen.append(got)
        return got

    monkeypatch.setattr(flash4_path, "_prepared", spy)
    x = make_inputs(1, 128, 2, 8, requires_grad=True)
    cfg = LAYOUTS[1]
    for _ in range(2):
        out = block_sparse_dilated_attention(x.q, x.k, x.v, [64], [1], sparse_config=cfg)
        out.sum().backward()
    assert len(seen) == 4 and all(s is seen[0] for s in seen)


def test_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    x = make_inputs(1, 64, 2, 8)
    # No flash-attn-4 here (or a CPU tensor): the tiles path, unless flash4 is forced.
    assert paths.flash4_reason(x.q, x.k) is not None
    assert paths.choose_path(x.q, x.k) == "tiles"
    with use_settings(sparse_flash4=False):
        assert paths.choose_path(x.q, x.k) == "tiles"
    with (
        use_settings(sparse_flash4=True),
        pytest.raises(
            ValueError, match=r"sparse_flash4=True cannot run this call on flash-attn-4: .*None"
        ),
    ):
        paths.choose_path(x.q, x.k)
    monkeypatch.setattr(flash4_block_sparse, "unsupported_reason", lambda *a, **k: None)
    assert paths.choose_path(x.q, x.k) == "flash4"
    empty = x.q[:, :0]
    assert paths.choose_path(empty, empty) == "tiles"


def test_the_tiles_path_without_flash4(monkeypatch: pytest.MonkeyPatch) -> None:
    """With flash-attn-4 absent the op never reaches the flash4 path."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the flash4 path ran")

    monkeypatch.setattr(flash4_path, "forward", refuse)
    monkeypatch.setattr(flash4_path, "backward", refuse)
    x = make_inputs(1, 96, 2, 8, requires_grad=True)
    out = block_sparse_dilated_attention(x.q, x.k, x.v, [32], [1], sparse_config=LAYOUTS[0])
    out.sum().backward()
    assert engine is not None and x.q.grad is not None


def _spec(**over: object) -> SubproblemSpec:
    fields: dict[str, object] = dict(
        device_type="cuda", device_index=0, dtype=torch.bfloat16, head_dim=128, heads=16,
        kv_heads=16, empty=False, equal_rows=True, is_causal=False, key_mask=False,
        dropout=False, backward=True,
    )  # fmt: skip
    fields.update(over)
    return SubproblemSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("major", "over", "reason"),
    [
        (9, {}, None),
        (9, {"head_dim": 64}, None),
        (10, {}, r"built for SM90's 128 x 128 sparse blocks \(this GPU is SM10x\)"),
        (8, {}, r"no backward before SM90"),
        (9, {"head_dim": 256}, r"up to head_dim 128, got 256"),
        (9, {"head_dim": 100}, r"multiple of 8, got 100"),
        (9, {"dtype": torch.float32}, r"float16/bfloat16, got torch.float32"),
        (9, {"dropout": True}, r"no dropout"),
        (9, {"device_type": "cpu"}, r"CUDA only"),
    ],
)
def test_reasons_by_capability(
    monkeypatch: pytest.MonkeyPatch, major: int, over: dict[str, object], reason: str | None
) -> None:
    monkeypatch.setattr(flash4, "HAS_FLASH_ATTN_4", True)
    monkeypatch.setattr(flash4, "cuda_capability_major", lambda index: major)
    monkeypatch.setattr(flash4_block_sparse, "cuda_capability_major", lambda index: major)
    got = flash4_block_sparse.spec_reason(_spec(**over))
    if reason is None:
        assert got is None
    else:
        assert got is not None
        assert __import__("re").search(reason, got), got


def test_reason_without_flash_attn_4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash4, "HAS_FLASH_ATTN_4", False)
    assert flash4_block_sparse.spec_reason(_spec()) == flash4.INSTALL_HINT
