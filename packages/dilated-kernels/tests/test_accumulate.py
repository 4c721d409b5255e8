"""add_into and add_windows (Triton under the interpreter, and the plain fallbacks): a call's
gradient added into a strided accumulator view, and overlapping key windows summed into one
accumulator against one window added at a time."""

from __future__ import annotations

import pytest
import torch

from dilated.core.settings import use_settings
from dilated.kernels import accumulate


def _windows(
    base: torch.Tensor, stack_dim: int, windows: int, rows: int, step: int, other: int
) -> torch.Tensor:
    """``(d0, rows, d2, d)`` view of ``base`` ``(other, total_rows, d)`` with overlapping windows
    along ``stack_dim``."""
    so, sr, _ = base.stride()
    if stack_dim == 0:
        return base.as_strided((windows, rows, other, base.shape[2]), (step * sr, sr, so, 1))
    return base.as_strided((other, rows, windows, base.shape[2]), (so, sr, step * sr, 1))


def _one_at_a_time(base: torch.Tensor, grad: torch.Tensor, stack_dim: int, step: int) -> None:
    for e in range(grad.shape[stack_dim]):
        g = grad.select(stack_dim, e)  # (d0 or d2, rows, d) after select
        if stack_dim == 0:
            base[:, e * step : e * step + grad.shape[1]] += g.transpose(0, 1)
        else:
            base[:, e * step : e * step + grad.shape[1]] += g


def _check_windows(
    stack_dim: int, windows: int, rows: int, step: int, other: int, d: int, device: str
) -> None:
    total = (windows - 1) * step + rows
    start = torch.randn(other, total, d, device=device)
    shape = (windows, rows, other, d) if stack_dim == 0 else (other, rows, windows, d)
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    want = start.clone()
    _one_at_a_time(want, grad.float(), stack_dim, step)
    got = start.clone()
    accumulate.add_windows(
        _windows(got, stack_dim, windows, rows, step, other), grad, stack_dim, step
    )
    # float32 sums of bfloat16 terms in another order: a few ulps of the sum.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("stack_dim", [0, 2])
@pytest.mark.parametrize(
    ("windows", "rows", "step"),
    [(5, 12, 4), (3, 8, 8), (6, 40, 4), (1, 7, 3), (4, 9, 2), (7, 64, 32)],
)
def test_add_windows_sums_every_overlap(
    fused: bool, stack_dim: int, windows: int, rows: int, step: int
) -> None:
    torch.manual_seed(windows * 100 + rows + step)
    with use_settings(fused_accumulate=fused):
        _check_windows(stack_dim, windows, rows, step, 3, 12, "cpu")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("b", "rows", "h", "d"), [(2, 37, 3, 16), (1, 70, 1, 24), (3, 5, 4, 64)])
def test_add_into_adds_across_layouts(fused: bool, b: int, rows: int, h: int, d: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    # Every other row and every other head of a larger buffer, as the engine's views are, and
    # a gradient laid out (batch, heads, rows, head_dim) as cuDNN returns it.
    base = torch.randn(b, 2 * rows, 2 * h, d, generator=gen)
    want = base.clone()
    grad = torch.randn(b, h, rows, d, generator=gen).to(torch.bfloat16).transpose(1, 2)
    want[:, ::2, ::2] += grad.float()
    with use_settings(fused_accumulate=fused):
        accumulate.add_into(base[:, ::2, ::2], grad)
    torch.testing.assert_close(base, want, rtol=1e-6, atol=1e-5)


def test_add_windows_rejects_a_stride_that_is_not_the_step() -> None:
    base = torch.zeros(2, 20, 4)
    acc = _windows(base, 0, 3, 8, 4, 2)
    with pytest.raises(ValueError, match="step_rows"):
        accumulate.add_windows(acc, torch.zeros(acc.shape), 0, 5)
    with pytest.raises(ValueError, match="stack_dim"):
        accumulate.add_windows(acc, torch.zeros(acc.shape), 1, 4)
    with pytest.raises(ValueError, match="shaped like acc"):
        accumulate.add_windows(acc, torch.zeros(1, 8, 2, 4), 0, 4)
    with pytest.raises(ValueError, match="shaped like acc"):
        accumulate.add_into(acc, torch.zeros(1, 8, 2, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stack_dim", [0, 2])
def test_add_windows_on_cuda(stack_dim: int) -> None:
    torch.manual_seed(stack_dim)
    # A band of 2W + 1 = 19 blocks of 128 rows, 14 windows, 16 heads of 128.
    _check_windows(stack_dim, 14, 19 * 128, 128, 16, 128, "cuda")


@pytest.mark.parametrize(("setting", "kernel_runs"), [(None, False), (True, True), (False, False)])
def test_the_fused_accumulate_setting_chooses_the_path(
    setting: bool | None, kernel_runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None decides per call (CPU accumulators: plain adds); True and False force it."""
    from dilated.kernels.triton_kernels import accumulate_kernel

    ran: list[str] = []
    monkeypatch.setattr(accumulate_kernel, "fused_add_into", lambda *a: ran.append("into"))
    monkeypatch.setattr(accumulate_kernel, "fused_add_windows", lambda *a: ran.append("windows"))
    acc, grad = torch.zeros(1, 8, 2, 4), torch.ones(1, 8, 2, 4)
    with use_settings(fused_accumulate=setting):
        accumulate.add_into(acc, grad)
        accumulate.add_windows(acc, grad, 0, 8)
    assert ran == (["into", "windows"] if kernel_runs else [])
    assert kernel_runs or torch.equal(acc, 2 * grad)  # the plain adds ran instead
