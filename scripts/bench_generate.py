"""Model-level decoding: greedy `generate`, eagerly and with `cuda_graph_decoding`, against fla's
DeltaNet model of the same shape.

    python scripts/bench_generate.py --commit $(git rev-parse HEAD) --out benchmarks/results/generate.json

In one process, for each batch size: a random prompt, then `generate` of a fixed number of new
tokens (greedy, `min_new_tokens` so that every row runs every step) by each way in turn, the order
alternating between rounds after one untimed round. Ways: `osdn_eager`; `osdn_cuda_graphs` (the
same model, `config.cuda_graph_decoding=True`; a GPU only); `fla_deltanet`, fla's
`DeltaNetForCausalLM` with the config's sizes (a GPU and flash-linear-attention only). Reports
ms a token (median and every round), whether our two ways gave the same tokens, and the ratios
to fla's; writes the JSON and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

import osdn_hf  # noqa: F401  (registers the Auto classes)
from osdn_hf.run_info import run_metadata
from osdn_hf.throughput import fla_deltanet_kwargs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fla_deltanet(config, device, dtype):
    """fla's DeltaNet model with `config`'s sizes, or the reason there is none."""
    if device.type != "cuda":
        return None, "fla's kernels need a GPU"
    try:
        from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    except ImportError as e:
        return None, f"flash-linear-attention is not installed ({e})"
    fc = DeltaNetConfig(**fla_deltanet_kwargs(config))
    return DeltaNetForCausalLM(fc).to(device, dtype).eval(), None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ways = [w for w in ("osdn_eager", "osdn_cuda_graphs", "fla_deltanet") if any(w in r["ms_per_token"] for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(ways)
    for i, way in enumerate(ways):
        xs = [j + i * width for j, r in enumerate(rows) if way in r["ms_per_token"]]
        ys = [r["ms_per_token"][way]["median"] for r in rows if way in r["ms_per_token"]]
        ax.bar(xs, ys, width, label=way)
    ax.set_xticks([j + width * (len(ways) - 1) / 2 for j in range(len(rows))], [f"batch {r['B']}" for r in rows])
    ax.set_ylabel("ms a token (median)")
    ax.set_title(f"greedy generate, {result['config']}, {result['dtype']}\n{result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/osdn-340m")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one untimed round comes first)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-peer", action="store_true", help="leave fla's model out")
    p.add_argument("--out", default="benchmarks/results/generate.json")
    p.add_argument("--commit", default="unknown")
    args = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes must be at least 1, got {args.batch_sizes}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    osdn = AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    models = {"osdn_eager": osdn}
    skipped = {}
    if device.type == "cuda":
        models["osdn_cuda_graphs"] = osdn
    else:
        skipped["osdn_cuda_graphs"] = "CUDA graphs need a GPU"
    if args.no_peer:
        skipped["fla_deltanet"] = "--no-peer"
    else:
        peer, why = fla_deltanet(config, device, dtype)
        if peer is None:
            skipped["fla_deltanet"] = why
        else:
            models["fla_deltanet"] = peer
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    with torch.no_grad():
        for B in args.batch_sizes:
            prompt = torch.randint(3, config.vocab_size, (B, args.prompt_len), device=device)
            mask = torch.ones_like(prompt)
            times, tokens = {w: [] for w in models}, {}
            for r in tqdm(range(args.rounds + 1), desc=f"batch {B}"):
                for way in list(models) if r % 2 == 0 else list(models)[::-1]:
                    osdn.config.cuda_graph_decoding = way == "osdn_cuda_graphs"
                    sync()
                    start = time.perf_counter()
                    out = models[way].generate(prompt, attention_mask=mask, **gen)
                    sync()
                    if r > 0:
                        times[way].append((time.perf_counter() - start) / args.new_tokens * 1e3)
                    tokens[way] = out[:, args.prompt_len :].tolist()
            ms = {w: dict(median=statistics.median(x), rounds=x) for w, x in times.items()}
            row = dict(B=B, ms_per_token=ms)
            if "osdn_cuda_graphs" in tokens:
                row["same_tokens_eager_and_graphs"] = tokens["osdn_eager"] == tokens["osdn_cuda_graphs"]
            if "fla_deltanet" in ms:
                fla = ms["fla_deltanet"]["median"]
                row["ratio_to_fla"] = {w: ms[w]["median"] / fla for w in ms if w != "fla_deltanet"}
            rows.append(row)
    osdn.config.cuda_graph_decoding = False
    result = dict(
        **run_metadata(args.commit, "scripts/bench_generate.py", argv),
        config=args.config,
        dtype=args.dtype,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        skipped=skipped,
        rows=rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")
    for row in rows:
        line = ", ".join(f"{w} {v['median']:.2f}" for w, v in row["ms_per_token"].items())
        ratios = ", ".join(f"{w} {v:.2f}x" for w, v in row.get("ratio_to_fla", {}).items())
        print(f"batch {row['B']}: ms a token: {line}" + (f"; against fla: {ratios}" if ratios else ""))
    for way, why in skipped.items():
        print(f"{way}: not run ({why})")
    return result


if __name__ == "__main__":
    main()
