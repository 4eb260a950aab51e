"""Perplexity of a model folder on a local text file.

python scripts/eval_perplexity.py --model outputs/osdn-demo --file some.txt --out ppl.json
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import osdn_hf  # noqa: F401  registers the OSDN Auto classes
from osdn_hf.evaluation import perplexity


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (with its tokenizer, or pass --tokenizer)")
    p.add_argument("--tokenizer")
    p.add_argument("--file", required=True, help="UTF-8 text file")
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--no-carry-state", action="store_true", help="score blocks independently")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    result = perplexity(
        model,
        tokenizer,
        Path(args.file).read_text(encoding="utf-8"),
        args.block_size,
        carry_state=not args.no_carry_state,
    )
    result.update(model=args.model, file=args.file, block_size=args.block_size, carry_state=not args.no_carry_state)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
