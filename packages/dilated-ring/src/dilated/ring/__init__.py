"""dilated.ring: sequence-parallel dilated attention over torch.distributed.

Each rank holds a shard of the sequence; [`ring_dilated_attention`][dilated.ring.functional.ring_dilated_attention] and the modules return
this rank's rows of the whole-sequence result defined in the docs' Concepts page, forward and backward.
"""

from dilated.ring.costs import CommCost, comm_cost
from dilated.ring.functional import ring_dilated_attention
from dilated.ring.modules import (
    DistributedImprovedDilatedAttention,
    DistributedImprovedMultiheadDilatedAttention,
    RingDilatedAttention,
    RingDistributedDilatedAttention,
    RingMultiheadDilatedAttention,
    create_ring_distributed_attention,
)
from dilated.ring.sharding import positions, shard, shard_positions, unshard

__version__ = "0.1.0"

__all__ = [
    "CommCost",
    "DistributedImprovedDilatedAttention",
    "DistributedImprovedMultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingDistributedDilatedAttention",
    "RingMultiheadDilatedAttention",
    "comm_cost",
    "create_ring_distributed_attention",
    "positions",
    "ring_dilated_attention",
    "shard",
    "shard_positions",
    "unshard",
]
