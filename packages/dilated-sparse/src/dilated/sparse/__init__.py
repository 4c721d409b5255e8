"""dilated.sparse: block-sparse dilated attention, exact, on the shared sub-problem primitive.

A block layout ([`SparsePatternConfig`][dilated.core.config.SparsePatternConfig]) restricts
every dense sub-problem of every dilated branch to some blocks of rows; the blocks that remain
are computed as a few dense rectangles per sub-problem and merged by their log-sum-exp.
"""

from dilated.core.config import SparsePatternConfig
from dilated.core.sparsity import BranchLayout, resolve_layouts
from dilated.sparse.distributed import block_sparse_ring_dilated_attention
from dilated.sparse.functional import block_sparse_dilated_attention
from dilated.sparse.modules import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingDistributedDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    DistributedBlockSparseDilatedAttention,
    DistributedBlockSparseMultiheadDilatedAttention,
    create_block_sparse_multihead_attention,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "BranchLayout",
    "DistributedBlockSparseDilatedAttention",
    "DistributedBlockSparseMultiheadDilatedAttention",
    "SparsePatternConfig",
    "__version__",
    "block_sparse_dilated_attention",
    "block_sparse_ring_dilated_attention",
    "create_block_sparse_multihead_attention",
    "resolve_layouts",
]
