"""dilated-longnet: LongNet transformer layers, models and generation on dilated attention.

Layers and models take their attention from the core factory by ``attention_type`` (any kind
registered in the ``dilated.attention`` entry points).

When transformers is already imported, importing this package also registers the Hugging Face
attention ``"dilated"`` (as ``import dilated.longnet.hf`` does), so that
``attn_implementation="dilated"`` does not fail with transformers' generic "not supported".
transformers is never imported here otherwise: it costs seconds.
"""

import contextlib
import sys

from dilated.longnet.config import LONGNET_PRESETS, LongNetConfig, TransformerLayerConfig
from dilated.longnet.cross_attention import CrossAttention
from dilated.longnet.generation import generate
from dilated.longnet.kv_cache import KVCache, LayerKVCache, cached_dilated_attention
from dilated.longnet.layers import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    create_decoder_layer,
    create_encoder_layer,
)
from dilated.longnet.magneto import magneto_gain
from dilated.longnet.models import LongNet, LongNetLM
from dilated.longnet.rotary import RotaryEmbedding
from dilated.longnet.static_decoder import StaticDecoder

__version__ = "0.1.0"

__all__ = [
    "LONGNET_PRESETS",
    "CrossAttention",
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "KVCache",
    "LayerKVCache",
    "LongNet",
    "LongNetConfig",
    "LongNetLM",
    "RotaryEmbedding",
    "StaticDecoder",
    "TransformerLayerConfig",
    "__version__",
    "cached_dilated_attention",
    "create_decoder_layer",
    "create_encoder_layer",
    "generate",
    "magneto_gain",
]

if "transformers" in sys.modules:
    # A transformers older than its mask interface (4.53) has nothing to register with.
    with contextlib.suppress(ImportError):
        import dilated.longnet.hf  # noqa: F401  (registers "dilated" with transformers)
