from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import settings

settings.register_profile("sparse", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("sparse")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The spawned gloo ranks import their worker module by name from this folder.
sys.path.insert(0, str(Path(__file__).parent))
