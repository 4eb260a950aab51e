"""The same training steps on one GPU and under FSDP on several: do the losses agree?

    python scripts/fsdp_parity.py --config configs/osdn-1.3b --gpus 2 --steps 30 \
        --out benchmarks/results/osdn-1.3b_fsdp_parity.json

Runs `scripts/train.py` twice through `accelerate launch`, with the same config, data,
tokenizer, seed and global batch: once with `configs/accelerate/single_gpu.yaml` (batch
`--global-batch` on one GPU), once with `configs/accelerate/fsdp.yaml` on `--gpus` GPUs
(`--global-batch / --gpus` rows each). Both log the loss at every step; the JSON holds both
curves, their largest difference, wall time and a PNG of the two curves beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(accelerate_config: str, processes: int, batch: int, out_dir: Path, args) -> dict:
    """One `accelerate launch scripts/train.py` run; its per-step losses and wall time."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / accelerate_config),
        "--num_processes",
        str(processes),
        str(ROOT / "scripts" / "train.py"),
        "--config",
        args.config,
        "--output-dir",
        str(out_dir),
        "--tokenizer",
        str(args.tokenizer_dir),
        "--block-size",
        str(args.block_size),
        "--batch-size",
        str(batch),
        "--max-steps",
        str(args.steps),
        "--warmup-steps",
        str(max(args.steps // 10, 1)),
        "--lr",
        str(args.lr),
        "--logging-steps",
        "1",
        "--save-steps",
        str(10 * args.steps),  # no checkpoint inside the run; train.py saves the final model
        "--seed",
        str(args.seed),
        "--bf16",
        "--gradient-checkpointing",
    ]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    history = json.loads((out_dir / "log_history.json").read_text())
    return {
        "accelerate_config": accelerate_config,
        "processes": processes,
        "batch_per_process": batch,
        "seconds": round(time.time() - start, 1),
        "losses": [h["loss"] for h in history if "loss" in h],
        "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
        "command": " ".join(cmd[2:]),
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("single_gpu", "-"), ("fsdp", "--")):
        run = result[key]
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, label=f"{key} ({run['processes']} GPU)")
    diffs = [abs(a - b) for a, b in zip(result["single_gpu"]["losses"], result["fsdp"]["losses"])]
    dx.semilogy(range(1, len(diffs) + 1), [max(d, 1e-6) for d in diffs])
    ax.set(xlabel="step", ylabel="training loss", title=f"{result['config']}: 1 GPU vs FSDP")
    dx.set(xlabel="step", ylabel="|loss difference|", title=result["device"])
    ax.legend()
    for a in (ax, dx):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/osdn-1.3b")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=32000, help="of the BPE trained once, shared by both runs")
    p.add_argument("--work-dir", default="outputs/fsdp_parity")
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default="unknown")
    args = p.parse_args(argv)
    if args.global_batch % args.gpus:
        raise ValueError(f"--global-batch {args.global_batch} must divide among --gpus {args.gpus}")
    if torch.cuda.device_count() < args.gpus:
        raise ValueError(f"--gpus {args.gpus}, but this machine has {torch.cuda.device_count()} GPUs")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    # one tokenizer for both runs, trained once here
    from osdn_hf.data import shakespeare_texts, train_bpe_tokenizer
    from osdn_hf.run_info import run_metadata

    args.tokenizer_dir = work / "tokenizer"
    train_bpe_tokenizer(shakespeare_texts(), vocab_size=args.vocab_size).save_pretrained(args.tokenizer_dir)

    result = {
        "config": args.config,
        **run_metadata(args.commit, "scripts/fsdp_parity.py", argv),
        "gpus": args.gpus,
        "accelerate": __import__("accelerate").__version__,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "block_size": args.block_size,
    }
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result["single_gpu"] = launch("configs/accelerate/single_gpu.yaml", 1, args.global_batch, work / "single", args)
    result["fsdp"] = launch(
        "configs/accelerate/fsdp.yaml", args.gpus, args.global_batch // args.gpus, work / "fsdp", args
    )
    a, b = result["single_gpu"]["losses"], result["fsdp"]["losses"]
    if len(a) != len(b):
        raise RuntimeError(f"the runs logged {len(a)} and {len(b)} losses")
    diffs = [abs(x - y) for x, y in zip(a, b)]
    result["max_abs_loss_diff"] = max(diffs)
    result["max_rel_loss_diff"] = max(d / abs(x) for d, x in zip(diffs, a))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("single_gpu", "fsdp")}, indent=1))
    print("single:", [round(x, 4) for x in a])
    print("fsdp:  ", [round(x, 4) for x in b])
    return result


if __name__ == "__main__":
    main()
