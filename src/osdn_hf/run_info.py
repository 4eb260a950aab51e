"""What every recorded result carries: the machine, the versions, the commit and the command."""

from __future__ import annotations

import platform
import sys

import torch


def run_metadata(commit: str, script: str | None = None, argv: list[str] | None = None) -> dict:
    """`device` (GPU name, else the CPU), `torch`, `transformers`, `triton` (None without it),
    `python`, `commit` and `command` (`python <script> <argv>`, by default this process's own).

    Example:
        >>> run_metadata("abc123", "scripts/mqar.py", ["--steps", "2"])["command"]
        'python scripts/mqar.py --steps 2'
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        triton=triton_version,
        python=platform.python_version(),
        commit=commit,
        command=command_line(script, argv),
    )


def command_line(script: str | None = None, argv: list[str] | None = None) -> str:
    """`python <script> <argv>`, by default this process's own command line."""
    return " ".join(["python", script or sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
