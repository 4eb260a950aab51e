"""Test set-up: without a GPU, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so before `osdn_hf` is imported:
conftest.py is loaded first. The interpreter is exact for float32 and float16 only.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
