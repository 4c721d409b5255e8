from __future__ import annotations

import torch
from hypothesis import settings

settings.register_profile("kernels", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("kernels")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
