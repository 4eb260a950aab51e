"""The metadata every recorded result carries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from osdn_hf.run_info import run_metadata


def test_run_metadata_names_machine_versions_commit_and_command():
    meta = run_metadata("abc123", "scripts/mqar.py", ["--steps", "2"])
    assert meta["command"] == "python scripts/mqar.py --steps 2"
    assert meta["commit"] == "abc123"
    assert meta["torch"] == torch.__version__
    assert meta["device"] and meta["python"] and meta["transformers"]
    assert set(meta) == {"device", "torch", "transformers", "triton", "python", "commit", "command"}


def test_check_kernels_merge_joins_shards_and_names_the_missing(tmp_path):
    """scripts/check_kernels.py --merge: rows of every readable shard in order, each naming its
    shard, failures summed, shards that wrote nothing or fewer rows than they planned listed, and
    a non-zero exit for any of these."""
    meta = dict(device="GPU", commit="abc", launch={"scans": {}})
    shards = []
    for i, (oks, planned) in enumerate((([True, True], 2), ([True, False], 2), ([True], 3))):
        path = tmp_path / f"ck{i}.json"
        rows = [dict(case=f"{i}-{j}", ok=ok) for j, ok in enumerate(oks)]
        shard = dict(meta, command=f"shard {i}", rows=rows, failures=oks.count(False), planned=planned)
        path.write_text(json.dumps(shard))
        shards.append(str(path))
    out = tmp_path / "all.json"
    cmd = [sys.executable, "scripts/check_kernels.py", "--merge", *shards, str(tmp_path / "none.json"), "--out", out]
    done = subprocess.run([str(c) for c in cmd], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    merged = json.loads(out.read_text())
    assert [r["case"] for r in merged["rows"]] == ["0-0", "0-1", "1-0", "1-1", "2-0"]
    assert [r["shard"] for r in merged["rows"]] == ["shard 0", "shard 0", "shard 1", "shard 1", "shard 2"]
    assert merged["failures"] == 1 and merged["shards"] == ["shard 0", "shard 1", "shard 2"]
    assert merged["unfinished_shards"] == [f"{shards[2]}: 1 of 3 cases"] and "planned" not in merged
    assert len(merged["missing_shards"]) == 1 and "none.json" in merged["missing_shards"][0]
    assert merged["launch"] == {"scans": {}} and merged["commit"] == "abc"
