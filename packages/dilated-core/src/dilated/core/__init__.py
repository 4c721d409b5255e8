"""dilated-core: exact LongNet dilated attention for PyTorch.

The public surface: configs, the reference op [`dilated_attention`][dilated.core.functional.dilated_attention], the LSE merge
[`merge_attention`][dilated.core.merge.merge_attention], the modules and their base classes, the registry/factory and the
memory pool. Test helpers live in [`dilated.core.testing`][dilated.core.testing].
"""

from dilated.core.base import BaseDilatedAttention, BaseMultiheadDilatedAttention
from dilated.core.config import (
    DilatedAttentionConfig,
    DistributedConfig,
    MemoryPoolConfig,
    MultiheadConfig,
    RingAttentionConfig,
    RingDistributedConfig,
    SparseAttentionConfig,
    SparsePatternConfig,
)
from dilated.core.functional import dilated_attention
from dilated.core.memory_pool import MemoryPool, PoolStats, get_default_pool
from dilated.core.merge import merge_attention
from dilated.core.modules import DilatedAttention, MultiheadDilatedAttention
from dilated.core.presets import PRESETS, Preset
from dilated.core.registry import (
    Implementation,
    available_implementations,
    create_dilated_attention,
    create_multihead_dilated_attention,
    get_implementation,
    register_implementation,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BaseDilatedAttention",
    "BaseMultiheadDilatedAttention",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "DistributedConfig",
    "Implementation",
    "MemoryPool",
    "MemoryPoolConfig",
    "MultiheadConfig",
    "MultiheadDilatedAttention",
    "PoolStats",
    "Preset",
    "RingAttentionConfig",
    "RingDistributedConfig",
    "SparseAttentionConfig",
    "SparsePatternConfig",
    "__version__",
    "available_implementations",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "dilated_attention",
    "get_default_pool",
    "get_implementation",
    "merge_attention",
    "register_implementation",
]
