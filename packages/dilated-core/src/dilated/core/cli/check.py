"""``dilated check``: every installed implementation against the dense float64 reference.

For each implementation that runs on the device (distributed ones as a world of one, see
[`select_implementations`][dilated.core.cli.selection.select_implementations]), the module
``impl.attention(segment_lengths, dilation_rates)`` is run on the random inputs of every case in
[`CASES`][dilated.core.cli.check.CASES] (bfloat16 on CUDA, float32 on CPU), and its output and q/k/v gradients (for one
random output gradient) are compared with the module's own dense float64 judge
([`dense_reference`][dilated.core.base.BaseDilatedAttention.dense_reference]: the dilated judge, or the
block-sparse one for a block-sparse module), with the Concepts page's measure ``max|x - ref| / max|ref|``
and bound ``tolerance(dtype)``. The report names what was checked and every kind that was not,
with the reason. The exit code
is 1 when any case fails or raises, or when nothing could be checked.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dilated.core.cli.options import name_list, resolve_device
from dilated.core.cli.progress import ProgressBar
from dilated.core.cli.selection import select_implementations
from dilated.core.cli.table import format_table
from dilated.core.registry import Implementation
from dilated.core.testing import make_inputs, relative_error, tolerance

# (batch, seq, heads, kv_heads, head_dim, segment_lengths, dilation_rates, causal, padding)
CASES: list[tuple[int, int, int, int, int, list[int], list[int], bool, bool]] = [
    (2, 64, 4, 4, 16, [16, 32], [1, 2], False, False),
    (1, 96, 4, 2, 16, [32, 64, 96], [1, 2, 4], True, False),
    (2, 77, 6, 3, 16, [16, 48], [1, 3], True, True),
    (1, 50, 2, 1, 32, [8, 64], [2, 4], False, True),
]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check", help="compare every installed implementation with the dense reference"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kinds", type=name_list, help="comma-separated kinds to check (default: every one)"
    )
    p.set_defaults(run=run)


def check_one(
    impl: Implementation, case: tuple[Any, ...], device: torch.device, seed: int
) -> tuple[float, float, torch.dtype]:
    """Largest relative output and gradient errors of ``impl`` on one case, and the dtype used."""
    b, n, h, hkv, d, ws, rs, causal, padding = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = make_inputs(
        b,
        n,
        h,
        d,
        kv_heads=hkv,
        dtype=dtype,
        device=device,
        padding=padding,
        requires_grad=True,
        seed=seed,
    )
    module = impl.attention(ws, rs)
    out = module(inp.q, inp.k, inp.v, is_causal=causal, key_padding_mask=inp.key_padding_mask)
    # The judge runs on float64 copies so that its gradients are not rounded to ``dtype``.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (inp.q, inp.k, inp.v))
    ref, _ = module.dense_reference(
        q64, k64, v64, is_causal=causal, key_padding_mask=inp.key_padding_mask
    )
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    got = torch.autograd.grad(out, (inp.q, inp.k, inp.v), grad)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    grad_err = max(relative_error(g, w) for g, w in zip(got, want))
    return relative_error(out, ref), grad_err, dtype


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    selection = select_implementations(device, args.kinds)
    impls = selection.run
    if not impls:
        # Nothing checked is a failure, not a pass: the packages' metadata (entry points) is missing.
        print(
            f"no dilated-attention implementation is registered for {device}: install the "
            "packages (pip install dilated-core) so that their dilated.attention entry points exist"
        )
        print("\n".join(selection.lines("checked")))
        return 1
    rows, failed = [], False
    refused: dict[str, int] = {}
    with ProgressBar(len(impls) * len(CASES), "check") as bar:
        for impl in impls:
            for idx, case in enumerate(CASES):
                try:
                    out_err, grad_err, dtype = check_one(impl, case, device, args.seed + idx)
                    ok = out_err < tolerance(dtype) and grad_err < tolerance(dtype)
                    row = (
                        impl.name,
                        idx,
                        str(dtype).removeprefix("torch."),
                        f"{out_err:.2e}",
                        f"{grad_err:.2e}",
                        "PASS" if ok else "FAIL",
                    )
                except ValueError as exc:
                    # A documented refusal of this input (e.g. the ring's divisibility rule), not
                    # a wrong answer; it is reported, and every kind must still pass some case.
                    ok, row = True, (impl.name, idx, "-", "-", "-", f"REFUSED: {exc}")
                    refused[impl.name] = refused.get(impl.name, 0) + 1
                except Exception as exc:  # report every implementation, even a broken one
                    ok, row = (
                        False,
                        (impl.name, idx, "-", "-", "-", f"ERROR {type(exc).__name__}: {exc}"),
                    )
                failed |= not ok
                rows.append(row)
                bar.update(f"{impl.name} case {idx}")
            if refused.get(impl.name) == len(CASES):
                failed = True  # refusing every case checks nothing
    print(
        f"device: {device}; case = (batch, seq, heads, kv_heads, head_dim, segments, rates, causal, padding)"
    )
    for idx, case in enumerate(CASES):
        print(f"  case {idx}: {case}")
    print(format_table(["kind", "case", "dtype", "out err", "grad err", "result"], rows))
    print("\n".join(selection.lines("checked")))
    if refused:
        print(
            "refused (ValueError: input outside what the implementation accepts, not a mismatch): "
            + ", ".join(f"{name} {n} of {len(CASES)} cases" for name, n in refused.items())
        )
    names = ", ".join(i.name for i in impls)
    if failed:
        print("MISMATCH: see the FAIL/ERROR rows (or a kind that refused every case)")
    else:
        print(
            f"{len(impls)} implementation(s) match the reference on every case they accept: {names}"
        )
    return 1 if failed else 0
