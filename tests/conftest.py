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
# Under pytest-xdist (the README's `-n 2`) the workers split the cores between them, rather than
# each starting a torch thread on every core (the interpreted kernels, most of the suite's time,
# are single-threaded Python anyway).
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
