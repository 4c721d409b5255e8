"""Hostile inputs to dilated-core: every bad argument is refused with a ValueError/TypeError whose
message names it (random valid calls are judged against the dense float64 reference in
test_reference.py); value checks (NaN/Inf) are opt-in, so meta tensors and torch.func
transforms work."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated.core import (
    DilatedAttention,
    DilatedAttentionConfig,
    DistributedConfig,
    MemoryPoolConfig,
    MultiheadConfig,
    MultiheadDilatedAttention,
    RingAttentionConfig,
    dilated_attention,
)
from dilated.core.checks import (
    CHECK_FINITE_ENV,
    ArgumentTypeError,
    check_bool,
    check_branch_list,
    resolve_check_finite,
)
from dilated.core.testing import make_inputs
from dilated.core.testing.invalid import (
    NOT_BOOLS,
    NOT_BRANCH_LISTS,
    InvalidCall,
    assert_refuses,
    invalid_calls,
)


@pytest.mark.parametrize("value", [*NOT_BOOLS, torch.tensor(True)])
def test_check_bool_refuses_everything_but_bools(value: object) -> None:
    with pytest.raises(ArgumentTypeError, match="flag must be a bool"):
        check_bool("flag", value)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


def test_a_tensor_in_a_bool_slot_points_to_key_padding_mask() -> None:
    with pytest.raises(TypeError, match=r"a torch\.Tensor of shape \(2, 8\).*key_padding_mask="):
        check_bool("is_causal", torch.ones(2, 8, dtype=torch.bool))


@pytest.mark.parametrize("value", [*NOT_BRANCH_LISTS, torch.tensor([4, 8]), (w for w in (4,))])
def test_check_branch_list_takes_ordered_sequences_only(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="segment_lengths"):
        check_branch_list("segment_lengths", value)


def test_check_branch_list_accepts_lists_tuples_and_ranges() -> None:
    for ok in ([4, 8], (4, 8), range(4, 12, 4)):
        assert check_branch_list("w", ok) == (4, 8)


@pytest.mark.parametrize(
    ("env", "expected"),
    [(None, False), ("", False), ("0", False), ("off", False), ("1", True), (" Yes ", True)],
)
def test_resolve_check_finite_reads_the_environment(
    env: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv(CHECK_FINITE_ENV, raising=False)
    else:
        monkeypatch.setenv(CHECK_FINITE_ENV, env)
    assert resolve_check_finite(None) is expected
    assert resolve_check_finite(True) is True and resolve_check_finite(False) is False


def test_resolve_check_finite_refuses_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHECK_FINITE_ENV, "enabled")
    with pytest.raises(ValueError, match="DILATED_CHECK_FINITE='enabled'"):
        resolve_check_finite(None)
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        resolve_check_finite("yes")  # type: ignore[arg-type]


def _valid(seq: int = 8, heads: int = 2, kv_heads: int = 2, rate: int = 1) -> tuple[Any, ...]:
    inp = make_inputs(1, seq, heads, 4, kv_heads=kv_heads, seed=seq)
    return inp.q, inp.k, inp.v, [4 * rate], [rate]


CALLS = invalid_calls(*_valid())


@pytest.mark.parametrize("call", CALLS, ids=repr)
def test_every_invalid_call_names_its_argument(call: InvalidCall) -> None:
    assert_refuses(dilated_attention, call)


@settings(max_examples=40)
@given(
    seq=st.integers(1, 12),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    rate=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_random_invalid_call_names_its_argument(
    seq: int, kv_heads: int, group: int, rate: int, data: st.DataObject
) -> None:
    calls = invalid_calls(*_valid(seq, kv_heads * group, kv_heads, rate))
    assert_refuses(dilated_attention, data.draw(st.sampled_from(calls)))


def test_assert_refuses_fails_on_silent_acceptance() -> None:
    call = InvalidCall("is_causal", "a string", (*_valid()[:3], [4], [1]), {"is_causal": "no"})

    def vague(*args: Any, **kwargs: Any) -> None:
        raise ValueError("bad input")

    with pytest.raises(AssertionError, match="accepted"):
        assert_refuses(lambda *args, **kwargs: None, call)
    with pytest.raises(AssertionError, match="does not name 'is_causal'"):
        assert_refuses(vague, call)


_ENTRY = st.one_of(
    st.integers(-2, 16), st.booleans(), st.floats(0, 8), st.text(max_size=2), st.none()
)
_BRANCH_LIST = st.one_of(
    st.lists(st.integers(1, 16), min_size=1, max_size=3),
    st.lists(_ENTRY, max_size=3),
    st.lists(_ENTRY, max_size=3).map(tuple),
    st.sets(st.integers(1, 8), max_size=3),
    st.integers(-2, 8),
    st.none(),
    st.text(max_size=3),
)


def _valid_branches(ws: object, rs: object) -> bool:
    if not (isinstance(ws, (list, tuple)) and isinstance(rs, (list, tuple))):
        return False
    entries = [*ws, *rs]
    return (
        len(ws) == len(rs) > 0
        and all(type(x) is int and x > 0 for x in entries)
        and all(w % r == 0 for w, r in zip(ws, rs))
    )


@settings(max_examples=150)
@given(ws=_BRANCH_LIST, rs=_BRANCH_LIST)
def test_random_branch_lists_are_accepted_exactly_when_valid(ws: Any, rs: Any) -> None:
    if _valid_branches(ws, rs):
        config = DilatedAttentionConfig(ws, rs)
        assert (config.segment_lengths, config.dilation_rates) == (tuple(ws), tuple(rs))
    else:
        with pytest.raises((TypeError, ValueError), match=r"segment_lengths|dilation_rates"):
            DilatedAttentionConfig(ws, rs)


@pytest.mark.parametrize("bad", NOT_BRANCH_LISTS)
def test_modules_and_configs_refuse_non_sequence_branches(bad: object) -> None:
    for name, args in (("segment_lengths", (bad, [1])), ("dilation_rates", ([4], bad))):
        with pytest.raises((TypeError, ValueError), match=name):
            DilatedAttention(*args)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match=name):
            MultiheadDilatedAttention(8, 2, *reversed(args))  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match=name):
            DilatedAttentionConfig(*args)  # type: ignore[arg-type]


def test_a_set_of_branches_is_never_paired_in_hash_order() -> None:
    with pytest.raises(TypeError, match="segment_lengths must be a sequence"):
        DilatedAttention({64, 8, 16}, [1, 2, 4])  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_config_booleans_are_strict(value: object) -> None:
    cases: list[tuple[str, Callable[[], object]]] = [
        ("is_causal", lambda: DilatedAttentionConfig((4,), (1,), is_causal=value)),  # type: ignore[arg-type]
        ("bias", lambda: MultiheadConfig(8, 2, bias=value)),  # type: ignore[arg-type]
        ("layer_norm", lambda: MultiheadConfig(8, 2, layer_norm=value)),  # type: ignore[arg-type]
        ("enabled", lambda: MemoryPoolConfig(enabled=value)),  # type: ignore[arg-type]
        ("checkpoint", lambda: RingAttentionConfig((4,), checkpoint=value)),  # type: ignore[arg-type]
        ("overlap", lambda: RingAttentionConfig((4,), overlap=value)),  # type: ignore[arg-type]
        ("check_finite", lambda: DilatedAttention([4], [1], check_finite=value or "no")),  # type: ignore[arg-type]
    ]
    for name, build in cases:
        with pytest.raises(TypeError, match=rf"{name} must be a bool"):
            build()


def test_fields_nothing_reads_are_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="overlap is deprecated and ignored"):
        RingAttentionConfig((4,), overlap=False)
    with pytest.warns(DeprecationWarning, match="backend is deprecated and ignored"):
        DistributedConfig(backend="gloo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults do not warn
        RingAttentionConfig((4,))
        DistributedConfig()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 0, "60", True, None])
def test_distributed_timeout_is_finite_and_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="timeout_s must be a finite positive number"):
        DistributedConfig(timeout_s=bad)  # type: ignore[arg-type]


def test_mask_in_the_is_causal_slot_is_named() -> None:
    inp = make_inputs(1, 8, 2, 4, seed=0)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"is_causal must be a bool.*key_padding_mask="):
        DilatedAttention([4], [1])(inp.q, inp.k, inp.v, mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"is_causal must be a bool.*key_padding_mask="):
        dilated_attention(inp.q, inp.k, inp.v, [4], [1], is_causal=mask)  # type: ignore[arg-type]
    mha = MultiheadDilatedAttention(8, 2, [1], [4])
    x = torch.randn(1, 8, 8)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        mha(x, x, x, mask)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="need_weights must be a bool"):
        mha(x, x, x, need_weights="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"key must be a torch\.Tensor"):
        mha(x, None, x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"q and k must agree in batch, seq and head_dim"):
        mha(x, torch.randn(2, 8, 8), torch.randn(2, 8, 8))


def test_modules_check_finite_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHECK_FINITE_ENV, raising=False)
    inp = make_inputs(1, 8, 2, 4, seed=0)
    q = inp.q.clone()
    q[0, 2, 1, 0] = float("inf")
    assert not torch.isfinite(DilatedAttention([4], [1])(q, inp.k, inp.v)).all()
    with pytest.raises(ValueError, match="q holds NaN or Inf"):
        DilatedAttention([4], [1], check_finite=True)(q, inp.k, inp.v)
    mha = MultiheadDilatedAttention(8, 2, [1], [4], check_finite=True)
    assert mha.attention.check_finite is True
    monkeypatch.setenv(CHECK_FINITE_ENV, "1")
    with pytest.raises(ValueError, match="q holds NaN or Inf"):
        DilatedAttention([4], [1])(q, inp.k, inp.v)
    DilatedAttention([4], [1], check_finite=False)(q, inp.k, inp.v)  # explicit False wins


def test_meta_device_op_and_modules() -> None:
    q = torch.empty(2, 20, 4, 8, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 20, 2, 8, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(2, 20, device="meta", dtype=torch.bool)
    out, lse = dilated_attention(
        q, k, k, [8, 16], [1, 2], is_causal=True, key_padding_mask=mask, return_lse=True,
        check_finite=True,  # a value check has nothing to read on meta: skipped
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (2, 4, 20) and lse.dtype == torch.float32
    assert DilatedAttention([8, 16], [1, 2])(q, k, k).shape == q.shape
    mha = MultiheadDilatedAttention(32, 4, [1, 2], [8, 16], num_kv_heads=2, device="meta")
    x = torch.empty(2, 20, 32, device="meta")
    y, _ = mha(x, x, x, is_causal=True)
    assert y.shape == (2, 20, 32) and y.device.type == "meta"


def test_torch_func_grad_and_vmap() -> None:
    inp = make_inputs(3, 12, 4, 4, kv_heads=2, dtype=torch.float64, padding=True, seed=1)
    ws, rs = [4, 8], [1, 2]
    mask = inp.key_padding_mask

    def loss(q: torch.Tensor) -> torch.Tensor:
        return dilated_attention(
            q, inp.k, inp.v, ws, rs, is_causal=True, key_padding_mask=mask
        ).sum()

    q = inp.q.detach().requires_grad_()
    loss(q).backward()
    assert torch.allclose(torch.func.grad(loss)(inp.q.detach()), q.grad)  # type: ignore[arg-type]

    def one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return dilated_attention(q[None], k[None], v[None], ws, rs, key_padding_mask=m[None])[0]

    batched = torch.func.vmap(one)(inp.q.detach(), inp.k.detach(), inp.v.detach(), mask)
    whole = dilated_attention(
        inp.q.detach(), inp.k.detach(), inp.v.detach(), ws, rs, key_padding_mask=mask
    )
    torch.testing.assert_close(batched, whole)
