"""dilated.kernels: backends for LongNet dilated attention and the ``"improved"`` modules."""

from dilated.kernels.backends import BACKEND_NAMES, available_backends
from dilated.kernels.functional import dilated_attention
from dilated.kernels.modules import (
    IMPLEMENTATION,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
)
from dilated.kernels.subproblem import subproblem_attention, subproblem_attention_backward

__all__ = [
    "BACKEND_NAMES",
    "IMPLEMENTATION",
    "ImprovedDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "available_backends",
    "dilated_attention",
    "subproblem_attention",
    "subproblem_attention_backward",
]

__version__ = "0.1.0"
