"""The dense-engine registry: names, per-call selection, the per-shape plan policy, errors.

Selection is tested on CPU by describing CUDA calls with a [`SubproblemSpec`] and setting what
each engine would find on the device (installed, capability); the engines' kernels themselves
run in test_engines_gpu.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dilated.core.settings import use_settings
from dilated.core.testing import assert_close_to_reference
from dilated.kernels import engines
from dilated.kernels.engines import (
    ENGINE_NAMES,
    ENGINES,
    SubproblemSpec,
    available_engines,
    choose_engine,
    cudnn,
    flash4,
    get_engine,
    reference,
    sdpa_flash,
    supporting_engines,
)
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    engines._supporting.clear()
    engines._seen_shapes.clear()
    engines._warned.clear()
    yield
    engines._supporting.clear()
    engines._seen_shapes.clear()
    engines._warned.clear()


def _device(
    monkeypatch: pytest.MonkeyPatch, *, major: int, fa4: bool, sdpa_flash_ok: bool = True
) -> None:
    """Make the engines see a CUDA GPU of capability ``major`` (flash-attn-4 installed or not)."""
    for module in (cudnn, flash4, sdpa_flash):
        if hasattr(module, "cuda_capability_major"):
            monkeypatch.setattr(module, "cuda_capability_major", lambda index: major)
    monkeypatch.setattr(cudnn, "has_cudnn_attention", lambda: True)
    monkeypatch.setattr(flash4, "installed", lambda: fa4)
    monkeypatch.setattr(sdpa_flash, "available", lambda device: sdpa_flash_ok)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def _spec(
    *,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    heads: int = 8,
    kv_heads: int = 8,
    equal_rows: bool = True,
    is_causal: bool = False,
    key_mask: bool = False,
    dropout: bool = False,
    backward: bool = False,
) -> SubproblemSpec:
    return SubproblemSpec(
        "cuda", 0, dtype, head_dim, heads, kv_heads, False, equal_rows, is_causal, key_mask,
        dropout, backward,
    )  # fmt: skip


def _tensors(rows: int = 1 << 16, heads: int = 8, head_dim: int = 128) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``rows`` rows (no memory: one element expanded). The default is a large call,
    above ``SMALL_CALL_WORK``."""
    x = torch.empty(1, 1, 1, 1).expand(1, rows, heads, head_dim)
    return x, x, x


def _names(spec: SubproblemSpec) -> list[str]:
    return [m.NAME for m in supporting_engines(spec)]


def test_registry_lists_every_engine_once_in_preference_order() -> None:
    assert ENGINE_NAMES == ("auto", "flash4", "cudnn", "sdpa_flash", "reference")
    assert list(ENGINES) == list(ENGINE_NAMES[1:])
    for name, module in ENGINES.items():
        assert name == module.NAME and get_engine(name) is module
        assert isinstance(module.PLANS_PER_SHAPE, bool) and isinstance(module.FALLBACK, bool)
        assert isinstance(module.HEAVY_HOST_PATH, bool)
    # Exactly one engine backs up the others, and it takes every call.
    assert [m.NAME for m in ENGINES.values() if m.FALLBACK] == ["reference"]


def test_unknown_engine_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"engine must be one of auto, flash4, cudnn.*'cutlass'"):
        get_engine("cutlass")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="engine must be one of"):
        subproblem_attention(q, q, q, scale=1.0, engine="cutlass")


def test_on_cpu_only_the_reference_engine_runs() -> None:
    assert available_engines("cpu") == ["reference"]
    q = torch.randn(1, 4, 2, 8)
    spec = SubproblemSpec.of(q, q, is_causal=False, key_mask=None, dropout_p=0.0)
    assert supporting_engines(spec) == (reference,)


def test_a_head_dim_mismatch_names_the_argument() -> None:
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"q and k must share head_dim.*8 and 16"):
        subproblem_attention(q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="share head_dim"):
        subproblem_attention_backward(q, q, k, k, q, torch.zeros(1, 2, 4), scale=1.0)


def test_hopper_with_flash4_runs_everything_it_can_there(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=9, fa4=True)
    for backward in (False, True):
        spec = _spec(kv_heads=2, is_causal=True, backward=backward)
        assert _names(spec) == ["flash4", "cudnn", "sdpa_flash", "reference"]
        assert choose_engine(spec, *_tensors()) is flash4
    assert _names(_spec(head_dim=256)) == ["flash4", "cudnn", "sdpa_flash", "reference"]
    # Unequal causal lengths: every flash kernel aligns the diagonal bottom-right.
    assert _names(_spec(is_causal=True, equal_rows=False)) == ["reference"]
    assert _names(_spec(dtype=torch.float32)) == ["reference"]
    assert _names(_spec(head_dim=12)) == ["reference"]


def test_hopper_backward_leaves_flash4_where_its_dq_is_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On SM90, flash-attn-4's backward returns a wrong dQ at head_dim 16, 48, 80 (measured in
    test_engines_gpu.py); the forward there is right and stays."""
    _device(monkeypatch, major=9, fa4=True)
    for head_dim in (16, 48, 80):
        assert _names(_spec(head_dim=head_dim))[0] == "flash4"
        with pytest.warns(UserWarning, match=rf"multiple of 32, got {head_dim}"):
            assert choose_engine(_spec(head_dim=head_dim, backward=True), *_tensors()) is not flash4
    for head_dim in (32, 64, 96, 160, 256):
        assert _names(_spec(head_dim=head_dim, backward=True))[0] == "flash4"
    _device(monkeypatch, major=10, fa4=True)  # the SM100 kernels are other code
    engines._supporting.clear()
    assert _names(_spec(head_dim=16, backward=True))[0] == "flash4"


def test_dropout_and_key_masks_leave_flash4_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=9, fa4=True)
    with pytest.warns(UserWarning, match="'cudnn' engine instead of 'flash4'.*no dropout"):
        assert choose_engine(_spec(dropout=True), *_tensors()) is cudnn
    with pytest.warns(UserWarning, match="instead of 'flash4'.*no arbitrary key mask"):
        assert _names(_spec(key_mask=True)) == ["cudnn", "reference"]
    # cuDNN takes masks and dropout only at the head sizes verified on the GPU.
    assert _names(_spec(key_mask=True, head_dim=32)) == ["reference"]


def test_without_flash4_the_warning_names_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=9, fa4=False)
    with pytest.warns(UserWarning, match="'reference' engine instead of 'cudnn'.*head_dim in"):
        assert _names(_spec(key_mask=True, head_dim=32)) == ["reference"]


def test_ampere_runs_flash4_forward_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=8, fa4=True)
    assert choose_engine(_spec(), *_tensors()) is flash4
    with pytest.warns(UserWarning, match="no backward before SM90"):
        assert _names(_spec(backward=True)) == ["cudnn", "sdpa_flash", "reference"]
    # head_dim 256: cuDNN stops at 128 before Hopper, flash-attn-4 at 128 on SM80.
    assert _names(_spec(head_dim=256)) == ["sdpa_flash", "reference"]


def test_without_flash4_a_new_shape_skips_the_cudnn_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=9, fa4=False)
    spec = _spec()
    first = _tensors(rows=(1 << 16) + 64)
    # The first sighting of a shape takes the engine without plans; from the
    # CUDNN_PLAN_AFTER-th on, cuDNN (planned once, then faster).
    picks = [choose_engine(spec, *first).NAME for _ in range(engines.CUDNN_PLAN_AFTER + 2)]
    assert picks == ["sdpa_flash"] * (engines.CUDNN_PLAN_AFTER - 1) + ["cudnn"] * 3
    # Every new length (decoding) is a new shape.
    assert choose_engine(spec, *_tensors(rows=(1 << 16) + 65)) is sdpa_flash
    # Dropout has one engine whose backward replays its mask: the plan is paid at once.
    assert choose_engine(_spec(dropout=True), *_tensors(rows=(1 << 16) + 66)) is cudnn
    # No flash kernels in this build: cuDNN plans every shape.
    engines._supporting.clear()
    monkeypatch.setattr(sdpa_flash, "available", lambda device: False)
    assert choose_engine(spec, *_tensors(rows=(1 << 16) + 67)) is cudnn


def test_no_cudnn_plan_is_built_inside_a_cuda_graph_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _device(monkeypatch, major=9, fa4=False)
    spec, shape = _spec(), _tensors()
    assert choose_engine(spec, *shape) is sdpa_flash  # warm-up, outside the capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose_engine(spec, *shape) is sdpa_flash
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert choose_engine(spec, *shape) is cudnn
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert choose_engine(spec, *shape) is cudnn  # planned already


@pytest.mark.parametrize("fa4", [True, False])
def test_small_calls_go_to_the_engine_with_the_lightest_host_path(
    monkeypatch: pytest.MonkeyPatch, fa4: bool
) -> None:
    """Up to ``SMALL_CALL_WORK`` (batch x rows_q x rows_k x heads x head_dim) the host sets the
    time, and PyTorch's flash kernels cost it less than flash-attn-4's Python wrapper; above
    it, the usual order. Without flash-attn-4 a small call stays on cuDNN, whose host path is
    as light and whose kernels are faster."""
    _device(monkeypatch, major=9, fa4=fa4)
    large = flash4 if fa4 else cudnn
    small = sdpa_flash if fa4 else cudnn

    def settled(spec: SubproblemSpec, *tensors: torch.Tensor) -> object:
        # The choice once the shape repeats (cuDNN has planned it by then).
        for _ in range(engines.CUDNN_PLAN_AFTER):
            choose_engine(spec, *tensors)
        return choose_engine(spec, *tensors)

    for backward in (False, True):
        spec = _spec(backward=backward)
        assert settled(spec, *_tensors(rows=4096)) is small  # 4096^2 x 8 x 128 = 2**34
        assert settled(spec, *_tensors()) is large
    # The boundary: a call of exactly SMALL_CALL_WORK is small, one key row more is not.
    edge = 1 << 12
    assert edge * edge * 8 * 128 == engines.SMALL_CALL_WORK
    q, k = _tensors(rows=edge)[0], _tensors(rows=edge + 1)[0]
    assert settled(_spec(), q, q, q) is small
    assert settled(_spec(equal_rows=False), q, k, k) is large
    # What PyTorch's flash kernels cannot take stays where it ran (key masks on cuDNN).
    assert settled(_spec(key_mask=True, head_dim=64), *_tensors(rows=64, head_dim=64)) is cudnn
    # A named engine runs the call whatever its size.
    assert choose_engine(_spec(), *_tensors(rows=64), large.NAME) is large
    # The setting turns the rule off.
    with use_settings(small_calls_on_sdpa_flash=False):
        assert settled(_spec(), *_tensors(rows=4097)) is large
    # Without PyTorch's flash kernels there is nothing lighter to go to.
    engines._supporting.clear()
    monkeypatch.setattr(sdpa_flash, "available", lambda device: False)
    assert settled(_spec(), *_tensors(rows=64)) is large


def test_a_named_engine_runs_what_it_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    _device(monkeypatch, major=9, fa4=True)
    assert choose_engine(_spec(), *_tensors(), "cudnn") is cudnn
    assert choose_engine(_spec(), *_tensors(), "sdpa_flash") is sdpa_flash
    assert choose_engine(_spec(), *_tensors(), "reference") is reference
    # A piece the named engine cannot take gets the auto choice (the same function).
    with pytest.warns(UserWarning, match="no arbitrary key mask"):
        assert choose_engine(_spec(key_mask=True), *_tensors(), "flash4") is cudnn


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_reference_engine_matches_float64_attention(causal: bool, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(kv_heads + 2 * causal)
    base = torch.randn(2, 30, 4, 8, generator=gen)
    q = base[:, 1::3]  # a strided view, as the dilated sub-problems are
    k, v = (torch.randn(2, 10, kv_heads, 8, generator=gen) for _ in range(2))
    out, lse = subproblem_attention(q, k, v, scale=0.4, is_causal=causal, engine="reference")
    kr, vr = (t.double().repeat_interleave(4 // kv_heads, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kr) * 0.4
    if causal:
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vr)
    assert_close_to_reference(out, want, torch.float32)
    assert_close_to_reference(lse, scores.logsumexp(-1), torch.float32, "lse")


def test_flash4_calls_from_threads_run_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CuTe DSL's compile aborts the process when two threads run it at once (the ring's
    ranks simulated on one GPU are threads): every flash-attn-4 call holds one lock."""
    import threading
    import time
    import types

    inside, most = 0, 0
    count = threading.Lock()

    def compile_and_run(*args: object, **kwargs: object) -> None:
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)
        with count:
            inside -= 1

    fake = types.SimpleNamespace(_flash_attn_fwd=compile_and_run)
    monkeypatch.setattr(flash4, "_interface", lambda: fake)
    threads = [
        threading.Thread(target=flash4.call_interface, args=("_flash_attn_fwd",)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
