"""MAGNETO gains against the formulas of arXiv 2210.06423, written out independently here."""

from __future__ import annotations

import math

import pytest

from dilated.longnet import LongNet, LongNetLM, magneto_gain


@pytest.mark.parametrize("n", [1, 2, 6, 12, 24, 96])
def test_encoder_only_and_decoder_only(n: int) -> None:
    expected = math.log(2 * n) ** 0.5
    assert magneto_gain(n, 0) == pytest.approx(expected, rel=1e-12)
    assert magneto_gain(0, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (6, 6), (12, 6), (3, 18)])
def test_encoder_decoder(n: int, m: int) -> None:
    enc = (math.log(3 * m) * math.log(2 * n) / 3) ** 0.5
    dec = math.log(3 * m) ** 0.5
    assert magneto_gain(n, m, part="encoder") == pytest.approx(enc, rel=1e-12)
    assert magneto_gain(n, m, part="decoder") == pytest.approx(dec, rel=1e-12)


def test_known_values() -> None:
    # 12-layer decoder-only: sqrt(ln 24) ~ 1.7827; 6+6 encoder-decoder decoder: sqrt(ln 18) ~ 1.7001
    assert magneto_gain(0, 12) == pytest.approx(1.78270, abs=1e-5)
    assert magneto_gain(6, 6, part="decoder") == pytest.approx(1.70011, abs=1e-5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 0), {}, "at least one"),
        ((-1, 2), {}, "num_encoder_layers"),
        ((2, 2), {}, "part="),
        ((2, 0), {"part": "decoder"}, "num_decoder_layers > 0"),
        ((2, 2), {"part": "middle"}, "part must be"),
    ],
)
def test_errors(args: tuple[int, int], kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        magneto_gain(*args, **kwargs)


def test_models_use_the_gain() -> None:
    lm = LongNetLM(
        num_tokens=11,
        d_model=16,
        nhead=2,
        num_encoder_layers=0,
        num_decoder_layers=3,
        segment_lengths=(4,),
        dilation_rates=(1,),
        dim_feedforward=32,
    )
    assert lm.layers[0].config.gamma_init == pytest.approx(math.log(6) ** 0.5)
    net = LongNet(
        d_model=16,
        nhead=2,
        num_encoder_layers=2,
        num_decoder_layers=4,
        segment_lengths=(4,),
        dilation_rates=(1,),
        dim_feedforward=32,
    )
    assert net.encoder[0].config.gamma_init == pytest.approx(
        (math.log(12) * math.log(4) / 3) ** 0.5
    )
    assert net.decoder[0].config.gamma_init == pytest.approx(math.log(12) ** 0.5)
