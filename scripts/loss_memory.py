"""Peak memory of the causal LM loss, forward and backward: transformers' against ours.

    python scripts/loss_memory.py --out benchmarks/results/loss_memory_cpu.json

For bf16 logits of the shape osdn-340m's training step produces (4 x 2048 tokens, 32000 words),
runs `ForCausalLMLoss` and `osdn_hf.layers.loss.causal_lm_loss`, each in a fresh process on the
CPU, and reports how far the process's peak resident memory rose above what it held once the
logits existed (`resource.getrusage`'s ru_maxrss). A GPU's allocator differs, but the tensors
each loss keeps and makes are the same on both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

LOSSES = ("transformers", "osdn_hf")


def measure(which: str, batch: int, seq: int, vocab: int) -> dict:
    """In this process: peak RSS above the baseline, in MiB, of one forward+backward."""
    import resource

    import torch

    torch.manual_seed(0)
    logits = torch.randn(batch, seq, vocab, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq))
    if which == "transformers":
        from transformers.loss.loss_utils import ForCausalLMLoss as fn
    else:
        from osdn_hf.layers.loss import causal_lm_loss as fn
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = fn(logits, labels, vocab_size=vocab)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(loss=float(loss), peak_above_logits_mib=(peak - base) / 1024, logits_mib=logits.numel() * 2 / 2**20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--one", choices=LOSSES, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.seq, args.vocab)))
        return
    from osdn_hf.run_info import run_metadata

    result = dict(**run_metadata(args.commit, "scripts/loss_memory.py", argv), batch=args.batch, seq=args.seq)
    result["vocab"] = args.vocab
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    for which in LOSSES:
        child = subprocess.run(
            [sys.executable, __file__, "--one", which, *shape], capture_output=True, text=True, check=True
        )
        row = result[f"loss_{which}"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{which:12s} peak {row['peak_above_logits_mib']:7.0f} MiB above the logits "
              f"({row['logits_mib']:.0f} MiB), loss {row['loss']:.6f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
