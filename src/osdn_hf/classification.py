"""Fine-tune OSDN as a sequence classifier with the Hugging Face `Trainer` (what
`scripts/train_classifier.py` runs).

Examples come from local .csv, .json, .jsonl or .parquet files with a text and a label column (any
labels: the classes are their sorted distinct values), or by default from the `shakespeare`
package: passages of a few lines, labelled with the play they come from. Texts are never cut
unless `--max-length` asks for it, and then the results say how many were.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .data import shakespeare_folder, train_bpe_tokenizer
from .run_info import run_metadata
from .training import data_format, plot_losses, scratch_config, tokenizer_folder

_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_PLAYS = ("hamlet", "macbeth")


def play_passages(plays: tuple[str, ...] = DEFAULT_PLAYS, lines: int = 4) -> tuple[list[str], list[str]]:
    """`(texts, labels)`: each play of the `shakespeare` package (modern spelling) cut into passages
    of `lines` non-empty lines, labelled with the play's name; as many of each play as the shortest
    play gives (its first ones), so that guessing one class scores 1 / len(plays)."""
    folder = shakespeare_folder()
    passages = []
    for play in plays:
        path = folder / f"{play}_gut.txt"
        if not path.is_file():
            raise ValueError(f"no play {play!r} in the shakespeare package")
        rows = [r.strip() for r in path.read_text(encoding="utf-8", errors="replace").splitlines() if r.strip()]
        passages.append(["\n".join(rows[i : i + lines]) for i in range(0, len(rows) - lines + 1, lines)])
    n = min(len(p) for p in passages)
    return [t for p in passages for t in p[:n]], [play for play in plays for _ in range(n)]


def load_examples(files: list[str] | None, text_column: str, label_column: str) -> tuple[list[str], list]:
    """`(texts, labels)` from local files (one format per call), or `play_passages()` if none."""
    if not files:
        return play_passages()
    fmt = data_format(files, _FORMATS)
    from datasets import load_dataset

    dataset = load_dataset(fmt, data_files=list(files), split="train")
    for flag, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{flag} {column!r} is not in the data; columns: {dataset.column_names}")
    texts, labels = dataset[text_column], dataset[label_column]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ValueError(f"{len(empty)} examples have no text (the first is row {empty[0]})")
    return texts, labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune OSDN as a sequence classifier with the HF Trainer.")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config", help="config folder to train from scratch (default: osdn-tiny's, embedded in the package)"
    )
    src.add_argument("--model", help="checkpoint folder to fine-tune (a causal LM's loads too: its head is new)")
    p.add_argument("--data", nargs="*", help="local .csv/.json/.jsonl/.parquet files (default: two plays' passages)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else a BPE trained on the texts)")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of a tokenizer trained on the spot")
    p.add_argument("--max-length", type=int, help="cut longer texts to this many tokens (default: never cut)")
    p.add_argument("--output-dir", default="outputs/classifier")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lr", type=float, default=3e-3, help="for a small model from scratch; a trained checkpoint wants less (2e-5)"
    )
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of examples held out for evaluation")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--commit", default="unknown", help="recorded in results.json with the machine and versions")
    args = p.parse_args(argv)
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must lie in (0, 1), got {args.eval_fraction}")
    if args.max_length is not None and args.max_length < 1:
        p.error(f"--max-length must be at least 1, got {args.max_length}")
    return args


def _accuracy(prediction) -> dict:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    out = Path(args.output_dir)
    texts, labels = load_examples(args.data, args.text_column, args.label_column)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"the labels hold {len(classes)} class; a classifier needs at least 2")
    class_id = {c: i for i, c in enumerate(classes)}

    tokenizer_dir = tokenizer_folder(args.tokenizer, args.model)
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    id2label = {i: str(c) for c, i in class_id.items()}
    heads = dict(num_labels=len(classes), id2label=id2label, label2id={name: i for i, name in id2label.items()})
    if args.model:
        model = AutoModelForSequenceClassification.from_pretrained(args.model, **heads)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        config = scratch_config(args.config)
        config.update(dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **heads))
        model = AutoModelForSequenceClassification.from_config(config)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")

    ids = tokenizer(list(texts))["input_ids"]
    cut = 0
    if args.max_length is not None:
        cut = sum(len(row) > args.max_length for row in ids)
        ids = [row[: args.max_length] for row in ids]
    rows = [{"input_ids": row, "labels": class_id[label]} for row, label in zip(ids, labels)]
    random.Random(args.seed).shuffle(rows)
    n_eval = max(1, math.ceil(len(rows) * args.eval_fraction))
    if n_eval >= len(rows):
        raise ValueError(f"{len(rows)} examples leave none to train on after {n_eval} held out")

    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.01,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=rows[n_eval:],
        eval_dataset=rows[:n_eval],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=_accuracy,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    results = {
        "classes": [str(c) for c in classes],
        "train_examples": len(rows) - n_eval,
        "eval_examples": n_eval,
        "texts_cut_to_max_length": cut,
        "eval_before": {"loss": before["eval_loss"], "accuracy": before["eval_accuracy"]},
        "eval_after": {"loss": after["eval_loss"], "accuracy": after["eval_accuracy"]},
        "final": str(final),
        **run_metadata(args.commit, "scripts/train_classifier.py", argv),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    plot_losses(trainer.state.log_history, out / "loss.png")
    print(
        f"eval accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f} "
        f"({n_eval} held-out examples of {len(classes)} classes); model in {final}, loss plot in {out / 'loss.png'}"
    )
    return results
