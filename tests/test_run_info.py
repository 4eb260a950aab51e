"""The metadata every recorded result carries."""

from __future__ import annotations

import torch

from osdn_hf.run_info import run_metadata


def test_run_metadata_names_machine_versions_commit_and_command():
    meta = run_metadata("abc123", "scripts/mqar.py", ["--steps", "2"])
    assert meta["command"] == "python scripts/mqar.py --steps 2"
    assert meta["commit"] == "abc123"
    assert meta["torch"] == torch.__version__
    assert meta["device"] and meta["python"] and meta["transformers"]
    assert set(meta) == {"device", "torch", "transformers", "triton", "python", "commit", "command"}
