"""The short convolution's decoding step, and a model's token-by-token generation with it.

    python scripts/bench_decode_conv.py --commit $(git rev-parse HEAD) --out benchmarks/results/decode_conv_cpu.json

A decoding step convolves one token with the cached W - 1 before it. `ShortConvolution` does
that as a multiply and a sum (`_one_step`) rather than a depthwise `F.conv1d`. This times both
ways in one process, alternating rounds: the step alone at a few widths, and `generate` of a
model with many thin layers (host work dominates, as in decoding at batch 1) with the step as it
is and with `F.conv1d` in its place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from osdn_hf import OSDNConfig, OSDNForCausalLM
from osdn_hf.layers.modules import ShortConvolution
from osdn_hf.run_info import run_metadata


def time_us(fn, calls: int, sync) -> float:
    """Mean wall time of `fn` (us) over `calls` calls, after 3 untimed ones."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/decode_conv.json")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 1024, 2048])
    p.add_argument("--layers", type=int, default=24, help="layers of the generating model (hidden size 64)")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated a round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200, help="calls of the step a round")
    args = p.parse_args(argv)
    for name in ("layers", "tokens", "rounds", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    # the step as it is, and as `F.conv1d` computes it (the form `_one_step` replaced)
    ways = dict(one_step=ShortConvolution._one_step, conv1d=ShortConvolution._convolve)
    steps = {w: {way: [] for way in ways} for w in args.widths}
    convs = {w: ShortConvolution(w, 4).to(device) for w in args.widths}
    xcats = {w: torch.randn(1, 4, w, device=device) for w in args.widths}
    config = OSDNConfig(
        hidden_size=64, intermediate_size=128, num_heads=2, num_hidden_layers=args.layers, vocab_size=256
    )
    model = OSDNForCausalLM(config).to(device).eval()
    ids = torch.randint(0, 256, (1, 8), device=device)
    generate = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    ms_per_token = {way: [] for way in ways}
    tokens = {}
    original = ShortConvolution._one_step
    try:
        with torch.no_grad():
            for r in tqdm(range(args.rounds), desc="rounds"):
                order = list(ways) if r % 2 == 0 else list(ways)[::-1]
                for way in order:
                    ShortConvolution._one_step = ways[way]
                    for w in args.widths:
                        steps[w][way].append(time_us(lambda c=convs[w], x=xcats[w]: c._one_step(x), args.calls, sync))
                    model.generate(ids, max_new_tokens=2, do_sample=False)
                    sync()
                    start = time.perf_counter()
                    out = model.generate(ids, **generate)
                    sync()
                    ms_per_token[way].append((time.perf_counter() - start) / args.tokens * 1e3)
                    tokens[way] = out[0].tolist()
    finally:
        ShortConvolution._one_step = original
    result = dict(
        **run_metadata(args.commit, "scripts/bench_decode_conv.py", argv),
        torch_threads=torch.get_num_threads(),
        step_us={
            str(w): {way: dict(rounds=x, median=statistics.median(x)) for way, x in s.items()} for w, s in steps.items()
        },
        generate=dict(
            layers=args.layers,
            hidden_size=64,
            tokens=args.tokens,
            ms_per_token={way: dict(rounds=x, median=statistics.median(x)) for way, x in ms_per_token.items()},
            same_tokens=tokens["one_step"] == tokens["conv1d"],
        ),
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for w in args.widths:
        m = {way: result["step_us"][str(w)][way]["median"] for way in ways}
        print(f"width {w}: step {m['conv1d']:.1f} us with F.conv1d, {m['one_step']:.1f} us as one multiply and sum")
    g = {way: result["generate"]["ms_per_token"][way]["median"] for way in ways}
    same = result["generate"]["same_tokens"]
    print(f"generate, {args.layers} layers: {g['conv1d']:.1f} -> {g['one_step']:.1f} ms a token; same tokens: {same}")
    return result


if __name__ == "__main__":
    main()
