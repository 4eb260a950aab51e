"""Pretraining and fine-tuning with the Hugging Face `Trainer` (what `scripts/train.py` runs).

Data come from local text, JSON or parquet files through `datasets` (default: the Shakespeare
plays of the `shakespeare` package; `datasets` is imported where data are read or packed, so
the module's constants and collator serve code without it). Documents are packed either into
fixed blocks (`--packing fixed`) or into variable-length packs (`--packing varlen`): whole
documents laid end to end in one row with `cu_seqlens`, so no document reads another's state.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from .configuration_osdn import OSDNConfig
from .data import shakespeare_texts, train_bpe_tokenizer
from .demo import DEMO_CONFIG

if TYPE_CHECKING:
    from datasets import Dataset

_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# transformers 5.23 renamed TrainingArguments' `gradient_checkpointing` to `activation_checkpointing`
# (the old name still works, with a FutureWarning); 5.17 knows only the old name.
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def data_format(files: list[str], formats: dict[str, str] = _FORMATS) -> str:
    """The `datasets` loader (`"json"`, ...) that reads all of `files`, from their suffixes, which
    `formats` maps to loaders; a ValueError where they need none or several."""
    suffixes = {Path(f).suffix for f in files}
    loaders = {formats.get(s) for s in suffixes}
    if None in loaders or len(loaders) != 1:
        raise ValueError(f"--data files must all be one of {sorted(formats)}, got suffixes {sorted(suffixes)}")
    return loaders.pop()


def load_texts(files: list[str] | None, text_column: str = "text") -> list[str]:
    """Documents from local files (one format per call), or the Shakespeare plays if none."""
    if not files:
        return shakespeare_texts()
    fmt = data_format(files)
    from datasets import load_dataset

    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    dataset = load_dataset(fmt, data_files=list(files), split="train", **kwargs)
    if text_column not in dataset.column_names:
        raise ValueError(f"--text-column {text_column!r} is not in the data; columns: {dataset.column_names}")
    return [t for t in dataset[text_column] if t]


def tokenizer_folder(tokenizer: str | None, model: str | None) -> str | None:
    """The folder to load the tokenizer from: `--tokenizer`, else the `--model` checkpoint's where
    it holds one, else None (train one on the data)."""
    if tokenizer:
        return tokenizer
    return model if model and Path(model, "tokenizer_config.json").exists() else None


def scratch_config(folder: str | None) -> OSDNConfig:
    """The config to train from scratch: `folder`'s `config.json`, or osdn-tiny's, embedded in the
    package, where `folder` is None (so the scripts run from any folder)."""
    if folder is None:
        return OSDNConfig(**DEMO_CONFIG)
    if not Path(folder, "config.json").is_file():
        raise ValueError(f"--config {folder} is not a folder with a config.json")
    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config, OSDNConfig):
        raise ValueError(f"--config {folder} is a {type(config).__name__}, not an OSDN config")
    return config


def pack_fixed(docs: list[list[int]], block_size: int, eos_id: int) -> Dataset:
    """Concatenate the documents (an EOS after each) and cut the stream into equal blocks."""
    stream = [t for doc in docs for t in (*doc, eos_id)]
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"the data have {len(stream)} tokens, fewer than one block of {block_size}")
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [stream[i * block_size : (i + 1) * block_size] for i in range(n)]})


def pack_varlen(docs: list[list[int]], block_size: int, eos_id: int) -> Dataset:
    """Pack whole documents into rows of at most `block_size` tokens, remembering their lengths.

    A document longer than a block is split into block-sized pieces.
    """
    rows, lengths, row, row_lengths = [], [], [], []
    for doc in docs:
        doc = [*doc, eos_id]
        for start in range(0, len(doc), block_size):
            piece = doc[start : start + block_size]
            if len(piece) < 2:
                continue
            if len(row) + len(piece) > block_size:
                rows.append(row)
                lengths.append(row_lengths)
                row, row_lengths = [], []
            row += piece
            row_lengths.append(len(piece))
    if row:
        rows.append(row)
        lengths.append(row_lengths)
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "seq_lengths": lengths})


class VarlenCollator:
    """Lay a batch of packed rows end to end in one row, with `cu_seqlens` at document boundaries."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [t for f in features for t in f["input_ids"]]
        lengths = [n for f in features for n in f["seq_lengths"]]
        input_ids = torch.tensor(ids).unsqueeze(0)  # (1, total)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        return {"input_ids": input_ids, "labels": input_ids.clone(), "cu_seqlens": cu_seqlens}


def plot_losses(log_history: list[dict], png: Path) -> None:
    """Training (and evaluation, if any) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if label == "train" else "o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain or fine-tune an OSDN model with the HF Trainer.")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config", help="config folder to pretrain from scratch (default: osdn-tiny's, embedded in the package)"
    )
    src.add_argument("--model", help="checkpoint folder to fine-tune (an OSDN or converted DeltaNet model)")
    p.add_argument("--data", nargs="*", help="local .txt/.json/.jsonl/.parquet files (default: Shakespeare)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else a BPE trained on the data)")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of a tokenizer trained on the spot")
    p.add_argument("--output-dir", default="outputs/train")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--packing", choices=("fixed", "varlen"), default="fixed")
    p.add_argument("--batch-size", type=int, default=8, help="rows per device and step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=100)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-fraction", type=float, default=0.02, help="share of blocks held out for evaluation")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    out = Path(args.output_dir)
    texts = load_texts(args.data, args.text_column)

    tokenizer_dir = tokenizer_folder(args.tokenizer, args.model)
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        # Trained once, by the main process, and saved: other processes (accelerate launch) and
        # later --resume runs load that one, so every rank and run shares one vocabulary.
        trained = out / "tokenizer"
        with PartialState().main_process_first():
            if trained.exists():
                tokenizer = AutoTokenizer.from_pretrained(trained)
            else:
                tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size)
                tokenizer.save_pretrained(trained)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which packing puts between documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = scratch_config(args.config)
        config.update(
            dict(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")

    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pack = pack_varlen if args.packing == "varlen" else pack_fixed
    data = pack(docs, args.block_size, tokenizer.eos_token_id).shuffle(seed=args.seed)
    n_eval = max(1, math.ceil(len(data) * args.eval_fraction))
    train_data, eval_data = data.select(range(n_eval, len(data))), data.select(range(n_eval))
    collator = VarlenCollator() if args.packing == "varlen" else DataCollatorForLanguageModeling(tokenizer, mlm=False)

    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.01,
        bf16=args.bf16,
        **({CHECKPOINTING_ARG: True} if args.gradient_checkpointing else {}),
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=args.save_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data, data_collator=collator
    )
    resume = get_last_checkpoint(str(out)) if args.resume and out.exists() else None
    if args.resume and resume is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()

    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    state = PartialState()
    if state.is_main_process:
        plot_losses(trainer.state.log_history, out / "loss.png")
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        print(f"eval loss {metrics['eval_loss']:.4f}; model in {final}, loss plot in {out / 'loss.png'}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()  # or NCCL may hold the launcher at exit
    return {"eval_loss": metrics["eval_loss"], "log_history": trainer.state.log_history, "final": str(final)}
