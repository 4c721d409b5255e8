from __future__ import annotations

import torch
from hypothesis import settings

settings.register_profile("sparse", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("sparse")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
