"""The one-launch Triton merge equals dilated.core.merge.merge_into (under the interpreter on
CPU): strided accumulators, 16-bit parts, rows empty on one side or both."""

from __future__ import annotations

import pytest
import torch

from dilated.core.merge import merge_into as merge_into_reference
from dilated.core.settings import use_settings
from dilated.kernels import merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "n", "h", "d"), [(2, 7, 3, 8), (1, 33, 1, 20), (3, 5, 4, 64)])
def test_fused_merge_is_merge_into(dtype: torch.dtype, b: int, n: int, h: int, d: int) -> None:

    gen = torch.Generator().manual_seed(n)
    # Strided accumulators (every other row of a larger buffer), as the engine's views are.
    acc = torch.randn(b, 2 * n, h, d, generator=gen)[:, ::2]
    acc_lse = torch.randn(b, h, 2 * n, generator=gen)[:, :, ::2]
    out = torch.randn(b, n, h, d, generator=gen).to(dtype)
    lse = torch.randn(b, h, n, generator=gen)
    acc_lse[:, :, 0] = float("-inf")  # nothing merged yet
    lse[:, :, 1] = float("-inf")  # the part covers nothing
    acc_lse[:, :, 2] = lse[:, :, 2] = float("-inf")  # empty on both sides
    acc[:, 2] = 0.0
    want_acc, want_lse = acc.clone(), acc_lse.clone()
    merge_into_reference(want_acc, want_lse, out, lse)
    with use_settings(fused_merge=True):
        merge.merge_into(acc, acc_lse, out, lse)
    assert torch.allclose(acc, want_acc, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(acc_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(acc_lse[finite], want_lse[finite], atol=1e-5)
    assert torch.equal(acc[:, 2], torch.zeros_like(acc[:, 2]))


@pytest.mark.parametrize("fused", [True, False])
def test_first_merge_writes_the_part_whatever_the_accumulators_hold(fused: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 9, 3, 16
    # Garbage in the accumulators: a first merge must not read it.
    acc = torch.full((b, 2 * n, h, d), float("nan"))[:, ::2]
    acc_lse = torch.full((b, h, 2 * n), float("nan"))[:, :, ::2]
    out = torch.randn(b, n, h, d, generator=gen).to(torch.bfloat16)
    lse = torch.randn(b, h, n, generator=gen)
    lse[:, :, 4] = float("-inf")
    out[:, 4] = 0.0  # a part's rows without keys are 0
    want_acc = torch.zeros(b, n, h, d)
    want_lse = torch.full((b, h, n), float("-inf"))
    merge_into_reference(want_acc, want_lse, out, lse)
    with use_settings(fused_merge=fused):
        merge.merge_into(acc, acc_lse, out, lse, first=True)
    assert torch.allclose(acc, want_acc, atol=1e-6)
    assert torch.equal(acc_lse, want_lse)


@pytest.mark.parametrize(("setting", "kernel_runs"), [(None, False), (True, True), (False, False)])
def test_the_fused_merge_setting_chooses_the_path(
    setting: bool | None, kernel_runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None decides per call (CPU accumulators: the plain formula); True and False force it."""
    from dilated.kernels.triton_kernels import merge_kernel

    ran: list[bool] = []
    monkeypatch.setattr(merge_kernel, "fused_merge_into", lambda *args: ran.append(True))
    acc, acc_lse = torch.zeros(1, 4, 2, 8), torch.full((1, 2, 4), float("-inf"))
    out, lse = torch.ones(1, 4, 2, 8), torch.zeros(1, 2, 4)
    with use_settings(fused_merge=setting):
        merge.merge_into(acc, acc_lse, out, lse)
    assert bool(ran) is kernel_runs
    assert kernel_runs or torch.equal(acc, out)  # the plain formula ran instead


def test_the_old_switch_is_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``merge.FUSED``, the switch before the settings, reads and writes ``fused_merge``."""
    from dilated.core.settings import get_settings

    with use_settings(fused_merge=None):
        with pytest.warns(DeprecationWarning, match="merge.FUSED is the setting 'fused_merge'"):
            monkeypatch.setattr(merge, "FUSED", True)
        assert get_settings().fused_merge is True
        with pytest.warns(DeprecationWarning, match="merge.FUSED"):
            monkeypatch.undo()  # writes the value read before: None
        assert get_settings().fused_merge is None
    with use_settings(fused_merge=False), pytest.warns(DeprecationWarning, match="merge.FUSED"):
        assert merge.FUSED is False
