"""Shared pytest set-up for every package's tests when run from the workspace root."""

from __future__ import annotations

import os

import torch

# Triton picks its interpreter when a kernel module is first imported, which may happen in any
# package's tests (the registry imports every installed implementation). Without CUDA, choose
# the interpreter before anything imports triton, so one process can run every package's tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
