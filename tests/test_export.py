"""scripts/export_for_hub.py: a folder that loads with trust_remote_code where osdn_hf is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_hf_integration import tokenizer  # noqa: F401  (module-scoped fixture)
from test_model import tiny_model

from osdn_hf.export import check_card, export_for_hub

REPO = Path(__file__).resolve().parents[1]
CLEAN_PYTHON = os.environ.get("OSDN_CLEAN_VENV_PYTHON")

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert sys.modules.get("osdn_hf") is None  # absent, or blocked by the caller
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder)
ids = tok("ROMEO:", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=6, do_sample=False)
ref = torch.load(sys.argv[2])
with torch.no_grad():
    assert torch.equal(model(ref["ids"]).logits, ref["logits"])
print("generated:", tok.decode(out[0]))
"""


@pytest.fixture()
def exported(tmp_path, tokenizer):  # noqa: F811
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    out = export_for_hub(tmp_path / "ckpt", tmp_path / "hub", REPO / "model_cards" / "osdn-340m.md")
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    return out, tmp_path / "ref.pt"


def test_export_writes_a_complete_folder(exported):
    out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_osdn.py",
        "configuration_osdn.py",
        "tokenizer.json",
    } <= names
    check_card((out / "README.md").read_text())


def _load_elsewhere(python: str, out: Path, ref: Path, block_package: bool):
    prelude = "import sys; sys.modules['osdn_hf'] = None\n" if block_package else ""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env["HF_MODULES_CACHE"] = str(out.parent / "modules")
    result = subprocess.run(
        [python, "-c", prelude + textwrap.dedent(LOAD), str(out), str(ref)],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated:" in result.stdout


def test_export_loads_where_the_package_cannot_be_imported(exported):
    _load_elsewhere(sys.executable, *exported, block_package=True)


@pytest.mark.skipif(
    CLEAN_PYTHON is None,
    reason="set OSDN_CLEAN_VENV_PYTHON to the python of a venv without osdn_hf (.ci/run builds one) to run this check",
)
def test_export_loads_in_a_clean_virtual_environment(exported):
    check = subprocess.run(
        [CLEAN_PYTHON, "-c", "import importlib.util as u; print(u.find_spec('osdn_hf'))"],
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "None", "the clean venv must not have osdn_hf"
    _load_elsewhere(CLEAN_PYTHON, *exported, block_package=False)


@pytest.mark.parametrize(
    "card, message", [("# no metadata\n", "YAML block"), ("---\nlicense: mit\n---\n# x\n", "lacks")]
)
def test_cards_without_metadata_are_refused(card, message):
    with pytest.raises(ValueError, match=message):
        check_card(card)


@pytest.mark.parametrize("name", ["osdn-340m.md", "osdn-1.3b.md"])
def test_shipped_model_cards_have_metadata(name):
    check_card((REPO / "model_cards" / name).read_text())
