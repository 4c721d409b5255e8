"""flash-attn-4 baselines of ``benchmarks/sparse.py``: the kernel alone on pre-gathered sub-problems.

For a call of the flash4 path (``dilated.sparse.flash4_path``), each of its flash-attn-4 calls
is replayed on contiguous copies of its strided views (the sub-problems pre-gathered, as a user
of flash-attn-4 would hand them over), writing into its own contiguous outputs, with:

- ``sparse``: the very block tables and ``mask_mod`` of the flash4 path (forward per query
  block, backward per key block): the work of the kernel alone, without views, workspace or
  merge; the baseline of each row;
- ``dense``: no block tables (every block of every sub-problem, causal where the call is): the
  dense baseline flash-attn-4's own efficiency is measured against.

Nothing here runs where the flash4 path does not (``runner`` returns None).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from dilated.core.sparsity import BranchLayout
from dilated.kernels import flash4_block_sparse as fa4
from dilated.kernels.engines import flash4
from dilated.sparse import flash4_path, paths


def runner(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layouts: Sequence[BranchLayout],
    block_size: int,
    causal: bool,
    grad: bool,
    dense: bool,
) -> Callable[[], None] | None:
    """A function that runs every flash-attn-4 call of the flash4 path's plan for these inputs
    on pre-gathered copies (forward, and backward with ``grad``), block-sparse or ``dense``;
    None where the flash4 path does not run."""
    if paths.flash4_reason(q, k) is not None:
        return None
    prepared = flash4_path._prepared(layouts, block_size, causal, q, k, v, None)
    tables = prepared.tables(q.device)
    scale = q.shape[-1] ** -0.5
    steps: list[Callable[[], None]] = []
    for call in prepared.plan.calls:
        qc, kc, vc = (
            flash4_path._view(x, call, keys).contiguous()
            for x, keys in ((q, False), (k, True), (v, True))
        )
        out = torch.empty_like(qc)
        lse = torch.empty(qc.shape[0], qc.shape[2], qc.shape[1], device=q.device)
        dout = torch.randn_like(qc)
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        fwd_lists, mask, aux = flash4_path.call_tables(call, tables[call.table], None, False)
        bwd_lists, _, _ = flash4_path.call_tables(call, tables[call.table], None, True)

        def step(
            qc: torch.Tensor = qc, kc: torch.Tensor = kc, vc: torch.Tensor = vc,
            out: torch.Tensor = out, lse: torch.Tensor = lse, dout: torch.Tensor = dout,
            dq: torch.Tensor = dq, dk: torch.Tensor = dk, dv: torch.Tensor = dv,
            fwd_lists: fa4.BlockLists = fwd_lists, bwd_lists: fa4.BlockLists = bwd_lists,
            mask: fa4.ElementMask = mask, aux: list[torch.Tensor] = aux,
        ) -> None:  # fmt: skip
            if dense:
                o, m = flash4._forward(qc, kc, vc, scale, causal)
                if grad:
                    flash4._backward(dout, qc, kc, vc, o, m, scale, causal)
                return
            fa4.forward(
                qc, kc, vc, scale=scale, tables=fwd_lists, mask=mask, aux=aux, out=out, lse=lse
            )
            if grad:
                fa4.backward(
                    dout, qc, kc, vc, out, lse, scale=scale, tables=bwd_lists, mask=mask,
                    aux=aux, dq=dq, dk=dk, dv=dv,
                )  # fmt: skip

        steps.append(step)

    def run() -> None:
        for step in steps:
            step()

    return run


def first_call_ms(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call of ``fn`` (synchronised) after the flash4 path's
    plans and tables are dropped, as at a new sequence length once its kernels are compiled:
    host planning, table building and uploads included."""
    flash4_path._PREPARED.clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3
