"""The end-to-end demo: train a tiny OSDN on Shakespeare on the CPU, save, reload, generate.

Run `python scripts/demo.py` (or `osdn-demo`). Every step uses the public Hugging Face API:
`Trainer` for training, `save_pretrained` / `AutoModelForCausalLM.from_pretrained` for the
checkpoint and `pipeline("text-generation")` for sampling.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    pipeline,
    set_seed,
)

from .configuration_osdn import OSDNConfig
from .data import pack_blocks, shakespeare_texts, train_bpe_tokenizer
from .modeling_osdn import OSDNForCausalLM

# The embedded default: configs/osdn-tiny/config.json (a test keeps the two equal).
DEMO_CONFIG = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=2,
    num_heads=2,
    intermediate_size=384,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="outputs/osdn-demo", help="where the checkpoint and tokenizer go")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-chars", type=int, default=1_500_000, help="characters of Shakespeare to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="ROMEO:")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    set_seed(args.seed)

    texts = shakespeare_texts(args.max_chars)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=DEMO_CONFIG["vocab_size"])
    blocks = pack_blocks(tokenizer("\n".join(texts))["input_ids"], args.block_size)
    n_eval = max(len(blocks) // 50, 8)
    from datasets import Dataset  # here, so that DEMO_CONFIG serves code without `datasets`

    train_ds = Dataset.from_dict({"input_ids": blocks[:-n_eval].tolist()})
    eval_ds = Dataset.from_dict({"input_ids": blocks[-n_eval:].tolist()})
    print(
        f"data: {sum(map(len, texts)):,} characters, {blocks.numel():,} tokens, "
        f"{len(train_ds)} train / {n_eval} eval blocks"
    )

    config = OSDNConfig(
        **DEMO_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = OSDNForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(30, args.steps // 10),
        weight_decay=0.01,
        logging_steps=max(args.steps // 10, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    generator = pipeline("text-generation", model=args.output_dir, device=-1)
    sample = generator(args.prompt, max_new_tokens=40, do_sample=True, top_k=50, temperature=0.8)[0]["generated_text"]

    print(f"\nsaved to {args.output_dir} and reloaded as {type(reloaded).__name__}")
    print(f"eval loss before training: {loss_before:.3f}")
    print(f"eval loss after {args.steps} steps: {loss_after:.3f}")
    print(f"sample:\n{sample}")
    print(f"done in {time.time() - start:.0f} s")
    return {"loss_before": loss_before, "loss_after": loss_after, "sample": sample}


if __name__ == "__main__":
    main()
