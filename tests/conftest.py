"""Test set-up: without a GPU, Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so before `osdn_hf` is imported:
conftest.py is loaded first. The interpreter is exact for float32 and float16 only.
The command-line wrappers in scripts/ are importable as modules, for the tests that call them.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
