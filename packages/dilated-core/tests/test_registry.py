"""Registry, entry points, factory and presets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dilated.core import (
    PRESETS,
    DilatedAttention,
    Implementation,
    MultiheadDilatedAttention,
    available_implementations,
    create_dilated_attention,
    create_multihead_dilated_attention,
    get_implementation,
    register_implementation,
)
from dilated.core import registry as reg


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved, saved_known = dict(reg._registered), dict(reg.KNOWN_KINDS)
    yield
    reg._registered.clear()
    reg._registered.update(saved)
    reg.KNOWN_KINDS.clear()
    reg.KNOWN_KINDS.update(saved_known)


def test_standard_comes_from_the_entry_point() -> None:
    impls = available_implementations()
    assert impls["standard"].attention is DilatedAttention
    assert impls["standard"].multihead is MultiheadDilatedAttention
    assert impls["standard"].package == "dilated-core"


def test_auto_on_cpu_never_picks_a_cuda_only_or_distributed_kind(clean_registry: None) -> None:
    class Fast(DilatedAttention):
        pass

    register_implementation(
        Implementation("fast", Fast, MultiheadDilatedAttention, "x", priority=99, devices=("cuda",))
    )
    register_implementation(
        Implementation("dist", Fast, MultiheadDilatedAttention, "x", priority=100, distributed=True)
    )
    assert get_implementation("auto", "cpu").name != "fast"
    assert get_implementation("auto", "cpu").name != "dist"
    assert get_implementation("auto", "cuda").name == "fast"
    with pytest.raises(ValueError, match="already registered"):
        register_implementation(
            Implementation("fast", DilatedAttention, MultiheadDilatedAttention, "y")
        )


def test_missing_package_is_named(clean_registry: None) -> None:
    reg.KNOWN_KINDS["hyper"] = "dilated-hyper"
    with pytest.raises(ValueError, match="pip install dilated-hyper"):
        create_dilated_attention("hyper", segment_lengths=[8], dilation_rates=[1])
    reg.KNOWN_KINDS["later"] = "dilated-core"  # installed, but registers no such kind
    with pytest.raises(
        ValueError, match="does not register it yet: pip install --upgrade dilated-core"
    ):
        create_dilated_attention("later", segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(ValueError, match=r"unknown kind 'nope'; choose one of .*standard"):
        create_dilated_attention("nope", segment_lengths=[8], dilation_rates=[1])


def test_factory_builds_modules() -> None:
    attn = create_dilated_attention(
        "standard", segment_lengths=[8, 16], dilation_rates=[1, 2], softmax_scale=0.5
    )
    assert isinstance(attn, DilatedAttention) and attn.config.scale == 0.5
    mha = create_multihead_dilated_attention(
        "standard",
        embed_dim=32,
        num_heads=4,
        segment_lengths=[8],
        dilation_rates=[1],
        num_kv_heads=2,
    )
    out, _ = mha(torch.randn(1, 8, 32), torch.randn(1, 8, 32), torch.randn(1, 8, 32))
    assert out.shape == (1, 8, 32)
    with pytest.raises(ValueError, match="segment_lengths is required"):
        create_dilated_attention("standard", dilation_rates=[1])
    with pytest.raises(ValueError, match="embed_dim is required"):
        create_multihead_dilated_attention(
            "standard", num_heads=4, segment_lengths=[8], dilation_rates=[1]
        )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_fill_the_factory(name: str) -> None:
    p = PRESETS[name]
    assert all(w % r == 0 for w, r in zip(p.segment_lengths, p.dilation_rates))
    assert p.max_seq == max(p.segment_lengths)
    mha = create_multihead_dilated_attention(name, device="cpu", embed_dim=64, num_heads=4)
    assert mha.attention_config.segment_lengths == p.segment_lengths
    assert mha.embed_dim == 64  # the caller's keywords win over the preset's
    full = create_multihead_dilated_attention(name, device="cpu")
    assert full.embed_dim == p.embed_dim and full.num_heads == p.num_heads


class _Attention(DilatedAttention):
    pass


def _impl(**overrides: object) -> Implementation:
    fields: dict[str, object] = {
        "name": "mine",
        "attention": _Attention,
        "multihead": MultiheadDilatedAttention,
        "package": "tests",
        **overrides,
    }
    return Implementation(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"priority": "high"}, TypeError, r"priority must be an int .*, got str 'high'"),
        ({"priority": 1.5}, TypeError, r"priority must be an int"),
        ({"priority": True}, TypeError, r"priority must be an int .*, got bool True"),
        ({"name": "auto"}, ValueError, r"name 'auto' is reserved.*could never be reached"),
        ({"name": sorted(PRESETS)[0]}, ValueError, r"is reserved: .*a preset"),
        ({"name": ""}, ValueError, r"name must be a non-empty str, .*got ''"),
        ({"name": ["mine"]}, TypeError, r"name must be a non-empty str"),
        ({"attention": int}, TypeError, r"attention must be a subclass of BaseDilatedAttention"),
        ({"attention": _Attention([8], [1])}, TypeError, r"attention must be a subclass"),
        (
            {"multihead": DilatedAttention},
            TypeError,
            r"multihead must be a subclass of BaseMultiheadDilatedAttention",
        ),
        ({"package": None}, TypeError, r"package must be a distribution name"),
        ({"devices": "cuda"}, TypeError, r"devices must be a tuple of device types"),
        ({"devices": ("cuda", 0)}, TypeError, r"devices\[1\] must be a device type"),
        ({"distributed": "no"}, TypeError, r"distributed must be a bool"),
        ({"backends": ["cudnn"]}, TypeError, r"backends must be a callable or None"),
    ],
)
def test_bad_implementation_fields_are_refused_when_built(
    overrides: dict[str, object], error: type[Exception], match: str, clean_registry: None
) -> None:
    with pytest.raises(error, match=match):
        _impl(**overrides)
    # Nothing reached the registry: "auto" still resolves.
    assert get_implementation("auto", "cpu").name in available_implementations()


def test_devices_given_as_a_list_are_stored_as_a_tuple(clean_registry: None) -> None:
    impl = _impl(devices=["cpu"], priority=10**6)
    assert impl.devices == ("cpu",) and hash(impl)
    register_implementation(impl)
    assert get_implementation("auto", "cpu") is impl
    with pytest.raises(TypeError, match="impl must be an Implementation"):
        register_implementation("mine")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [["standard"], None, ("standard",), 3])
def test_kind_must_be_one_name(kind: object) -> None:
    for call in (
        lambda: get_implementation(kind),  # type: ignore[arg-type]
        lambda: create_dilated_attention(kind, segment_lengths=[8], dilation_rates=[1]),  # type: ignore[arg-type]
        lambda: create_multihead_dilated_attention(kind, embed_dim=8, num_heads=2),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"kind must be one name, a str"):
            call()
