"""The block-sparse flash-attn-4 entry points without flash-attn-4: what they hand the kernel.

flash-attn-4 cannot run here, so its interface is replaced by a recorder: the tests check the
arguments each entry point passes (their order, the output tensors, the mask and aux tensors)
and the rules' validation. The kernels themselves are checked by dilated-sparse's GPU tests.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from dilated.kernels import flash4_block_sparse, flash4_masks, piece_gather
from dilated.kernels.engines import flash4
from dilated.kernels.flash4_block_sparse import BlockLists
from dilated.kernels.flash4_masks import KEEP_PER_BATCH, KEEP_PER_HEAD, ElementMask


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _flash_attn_fwd(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("fwd", args, kwargs))

    def _flash_attn_bwd(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("bwd", args, kwargs))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(flash4, "_interface", lambda: rec)
    monkeypatch.setattr(flash4_block_sparse, "_sparse_tensors", lambda tables: ("sparse", tables))
    monkeypatch.setattr(flash4_block_sparse, "mask_mod", lambda mask: ("mask_mod", mask))
    return rec


def _lists() -> BlockLists:
    cnt = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    return BlockLists(cnt, idx, cnt, idx)


def test_forward_hands_the_kernel_its_outputs_and_mask(recorder: _Recorder) -> None:
    q, k, v = (torch.randn(2, 200, 4, 8) for _ in range(3))
    out, lse = torch.empty(2, 200, 4, 8), torch.empty(2, 4, 200)
    keep = torch.ones(2, 256, dtype=torch.int32)
    mask = ElementMask(causal=True, keep=KEEP_PER_BATCH)
    tables = _lists()
    flash4_block_sparse.forward(
        q, k, v, scale=0.5, tables=tables, mask=mask, aux=[keep], out=out, lse=lse
    )
    (kind, args, kwargs), = recorder.calls  # fmt: skip
    assert kind == "fwd" and args == (q, k, v)
    assert kwargs["out"] is out and kwargs["lse"] is lse and kwargs["return_lse"] is True
    assert kwargs["softmax_scale"] == 0.5 and kwargs["causal"] is False
    assert kwargs["mask_mod"] == ("mask_mod", mask)
    assert kwargs["aux_tensors"] == [keep]
    assert kwargs["block_sparse_tensors"] == ("sparse", tables)


def test_backward_hands_the_kernel_the_final_output_and_its_gradients(recorder: _Recorder) -> None:
    q, k, v, out, dout = (torch.randn(1, 64, 2, 8) for _ in range(5))
    lse = torch.randn(1, 2, 64)
    dq, dk, dv = (torch.empty(1, 64, 2, 8) for _ in range(3))
    mask = ElementMask()
    flash4_block_sparse.backward(
        dout, q, k, v, out, lse, scale=1.0, tables=_lists(), mask=mask, aux=[],
        dq=dq, dk=dk, dv=dv,
    )  # fmt: skip
    (kind, args, kwargs), = recorder.calls  # fmt: skip
    # flash-attn-4's order: q, k, v, out, dout, lse.
    assert kind == "bwd" and args == (q, k, v, out, dout, lse)
    assert kwargs["dq"] is dq and kwargs["dk"] is dk and kwargs["dv"] is dv
    # A rule that checks nothing needs no mask_mod and no aux tensors.
    assert kwargs["mask_mod"] is None and kwargs["aux_tensors"] is None
    assert kwargs["causal"] is False


def test_aux_tensors_must_match_the_rule(recorder: _Recorder) -> None:
    q = torch.randn(1, 64, 2, 8)
    mask = ElementMask(layout_block=64, keep=KEEP_PER_HEAD)
    with pytest.raises(ValueError, match=r"aux must hold 2 tensors for ElementMask"):
        flash4_block_sparse.forward(
            q, q, q, scale=1.0, tables=_lists(), mask=mask, aux=[q], out=q, lse=q[..., 0]
        )
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout_block": -1}, r"layout_block must be >= 0, got -1"),
        ({"keep": 3}, r"keep must be 0, KEEP_PER_BATCH \(1\) or KEEP_PER_HEAD \(2\), got 3"),
    ],
)
def test_element_mask_checks_its_fields(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ElementMask(**kwargs)  # type: ignore[arg-type]


def test_element_mask_checks_anything() -> None:
    assert not ElementMask().checks_anything
    assert ElementMask(causal=True).checks_anything
    assert ElementMask(layout_block=32).checks_anything
    assert ElementMask(keep=KEEP_PER_BATCH).checks_anything


def test_the_cute_mask_module_parses_and_builds_one_function_per_rule() -> None:
    """Its CuTe DSL cannot be imported here: parse it, and check that the factory captures
    exactly the rule's fields (flash-attn-4 keys compiled kernels by them)."""
    path = Path(flash4_masks.__file__).with_name("flash4_cute_masks.py")
    tree = ast.parse(path.read_text())
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
    assert [a.arg for a in build.args.args] == ["causal", "layout_block", "keep"]
    inner = next(n for n in build.body if isinstance(n, ast.FunctionDef))
    assert [a.arg for a in inner.args.args] == [
        "batch", "head", "m_idx", "n_idx", "seqlen_info", "aux_tensors",
    ]  # fmt: skip
    source = inspect.getsource(flash4_masks.mask_mod)
    assert "flash4_cute_masks.build(mask.causal, mask.layout_block, mask.keep)" in source


def test_piece_tables_are_checked() -> None:
    out = torch.empty(1, 8, 2, 4)
    lse = torch.empty(1, 2, 8)
    bad = torch.zeros(1, 1, 1, 2, 8, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"table must be contiguous int64 holding \(branches, rmax"
    ):
        piece_gather.merge_pieces(bad, out, lse, [8], [1], 1)
