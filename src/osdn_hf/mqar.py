"""Multi-query associative recall (MQAR) in the Zoology setup, on `OSDNForCausalLM`.

A sequence holds `num_pairs` key-value pairs (keys from the lower half of the vocabulary,
values from the upper half, token 0 is filler), then each key once more, at random places in
the rest of the sequence, followed by its value. Loss and accuracy count only the answers:
the value right after each queried key.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .analysis import recall_residual
from .configuration_osdn import OSDNConfig
from .modeling_osdn import OSDNForCausalLM
from .run_info import command_line, run_metadata

MODELS = {
    "osdn": dict(preconditioner="osdn", use_apf=True),
    "osdn_no_apf": dict(preconditioner="osdn", use_apf=False),
    "deltanet": dict(preconditioner="none"),
}
SETTINGS = ((512, 64), (1024, 128), (2048, 256))
# The preconditioner settings a sweep may vary (`--precond-eta-init` ...), and the models they affect.
OVERRIDES = ("precond_eta_init", "eta_max", "apf_init")
RELEVANT = {"osdn": set(OVERRIDES), "osdn_no_apf": {"precond_eta_init", "eta_max"}, "deltanet": set()}


def mqar_batch(batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator):
    """`input_ids` `[B, seq_len]`, `labels` `[B, seq_len]` and the context mask `[B, seq_len]`.

    `labels` follow the Hugging Face convention (the model shifts them): -100 everywhere but at
    the answer positions, where they equal `input_ids`, so only the prediction made at each
    query key, of the value that follows it, is scored.
    """
    if 4 * num_pairs > seq_len:
        raise ValueError(
            f"MQAR needs seq_len >= 4 * num_pairs (pairs, then one query each), got {seq_len}, {num_pairs}"
        )
    half = vocab_size // 2
    if num_pairs > half - 1:
        raise ValueError(f"{num_pairs} distinct keys do not fit in the key half of a {vocab_size}-token vocabulary")
    B, P = batch_size, num_pairs
    dev = dict(generator=generator, device=generator.device)  # drawn where the generator lives (CPU or GPU)
    keys = torch.argsort(torch.rand(B, half - 1, **dev), dim=1)[:, :P] + 1  # distinct, in [1, half)
    values = torch.randint(half, vocab_size, (B, P), **dev)
    seq = torch.zeros(B, seq_len, dtype=torch.long, device=generator.device)
    seq[:, 0 : 2 * P : 2], seq[:, 1 : 2 * P : 2] = keys, values
    # queries: each key once, in a random order, at random two-token slots after the context
    slots = (seq_len - 2 * P) // 2
    slot = torch.argsort(torch.rand(B, slots, **dev), dim=1)[:, :P]  # (B, P)
    order = torch.argsort(torch.rand(B, P, **dev), dim=1)
    pos = 2 * P + 2 * slot  # position of each query key
    rows = torch.arange(B, device=generator.device)[:, None]
    seq[rows, pos] = keys.gather(1, order)
    seq[rows, pos + 1] = values.gather(1, order)
    labels = torch.full_like(seq, -100)
    labels[rows, pos + 1] = seq[rows, pos + 1]
    context = torch.zeros_like(seq, dtype=torch.bool)
    context[:, : 2 * P] = True
    return seq, labels, context


def train_pairs(num_pairs: int, mix: int) -> list[int]:
    """Pair counts of a training batch: `num_pairs` and the `mix - 1` halvings below it (at least 4).

    Zoology trains MQAR on a mixture of easy and hard examples and tests on the hard ones; the
    easy ones let the recall circuit form before the full task is learnable.
    """
    if mix < 1:
        raise ValueError(f"--train-mix must be at least 1, got {mix}")
    return sorted({max(num_pairs >> i, min(4, num_pairs)) for i in range(mix)})


def mqar_mixture_batch(batch_size: int, seq_len: int, pairs: list[int], vocab_size: int, generator: torch.Generator):
    """`mqar_batch` with the batch split evenly over the pair counts in `pairs` (largest last)."""
    if batch_size < len(pairs):
        raise ValueError(f"a batch of {batch_size} cannot hold the {len(pairs)} pair counts {pairs}")
    sizes = [batch_size // len(pairs)] * len(pairs)
    sizes[-1] += batch_size - sum(sizes)
    parts = [mqar_batch(n, seq_len, p, vocab_size, generator) for n, p in zip(sizes, pairs)]
    return tuple(torch.cat(x) for x in zip(*parts))


def build_model(
    name: str, d_model: int, vocab_size: int, num_heads: int, seed: int, **config_overrides
) -> OSDNForCausalLM:
    torch.manual_seed(seed)
    config = OSDNConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=2,
        num_heads=num_heads,
        **MODELS[name],
        **config_overrides,
    )
    return OSDNForCausalLM(config)


def answer_logits(model: OSDNForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor):
    """Logits at the query positions only, and the answers they must predict.

    The same numbers as `model(input_ids, labels=labels)` scores (HF shift: the prediction at
    `t` is of token `t + 1`), without the `[B, T, vocab]` logits of every other position, which
    at seq 2048 and vocabulary 8192 would take tens of GB for nothing.
    """
    query = torch.zeros_like(labels, dtype=torch.bool)
    query[:, :-1] = labels[:, 1:] != -100
    hidden = model.model(input_ids, use_cache=False).last_hidden_state
    return model.lm_head(hidden[query]), labels.roll(-1, 1)[query]


def answer_loss(model: OSDNForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answers: equal to the model's own loss with these labels."""
    logits, targets = answer_logits(model, input_ids, labels)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model, batches) -> tuple[float, float]:
    model.eval()
    correct = total = 0
    loss = 0.0
    for input_ids, labels, _ in batches:
        logits, targets = answer_logits(model, input_ids, labels)
        correct += (logits.argmax(-1) == targets).sum().item()
        total += targets.numel()
        loss += torch.nn.functional.cross_entropy(logits.float(), targets).item()
    model.train()
    return correct / total, loss / len(batches)


def train_one(
    name: str,
    d_model: int,
    seq_len: int,
    num_pairs: int,
    lr: float,
    steps: int,
    batch_size: int,
    vocab_size: int,
    num_heads: int,
    seed: int,
    eval_every: int,
    device: str,
    progress: bool = True,
    deadline: float | None = None,
    train_mix: int = 1,
    config_overrides: dict | None = None,
    resume_dir: Path | None = None,
) -> dict | None:
    """Train one model on fresh MQAR batches; return its final accuracy, curve and residuals.

    `config_overrides` (OSDNConfig fields, e.g. `precond_eta_init`) are recorded in the row.

    Training batches mix `train_pairs(num_pairs, train_mix)` pair counts; evaluation uses
    `num_pairs` only. Returns None, recording nothing, if the clock passes `deadline` (a
    `time.time()` value) before the run ends: an unfinished run is not a result. With
    `resume_dir`, such a run first saves its whole training state there (model, optimizer,
    schedule, random generators, curve, seconds spent), and a later call with the same run
    continues from it, as if never stopped; the finished run's checkpoint is deleted.
    """
    pairs = train_pairs(num_pairs, train_mix)
    gen = torch.Generator(device).manual_seed(seed)
    eval_gen = torch.Generator(device).manual_seed(10_000 + seed)
    config_overrides = dict(config_overrides or {})
    model = build_model(name, d_model, vocab_size, num_heads, seed, **config_overrides).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    eval_batches = [mqar_batch(batch_size, seq_len, num_pairs, vocab_size, eval_gen) for _ in range(2)]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    settings = preconditioner_config(model.config)
    ckpt = None
    if resume_dir is not None:
        run = run_identity(name, d_model, seq_len, num_pairs, lr, steps, batch_size, vocab_size, num_heads, seed,
                           eval_every, pairs, settings)  # fmt: skip
        ckpt = Path(resume_dir) / checkpoint_name(run)
    curve, first, spent, pieces = [], 1, 0.0, 1
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["run"] != run:
            raise ValueError(f"MQAR checkpoint {ckpt} is of another run: {state['run']}, not {run}")
        if state["device_type"] != gen.device.type:  # a CUDA generator's state does not fit a CPU one
            raise ValueError(f"MQAR checkpoint {ckpt} was saved on {state['device_type']}, not {gen.device.type}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["generator"].to(gen.get_state().device))
        curve, first, spent, pieces = state["curve"], state["step"] + 1, state["seconds"], state["pieces"] + 1
    start = time.time()
    bar = tqdm(
        range(first, steps + 1),
        desc=f"{name} d={d_model} L={seq_len} lr={lr:g}",
        initial=first - 1,
        total=steps,
        disable=not progress,
        leave=False,
    )
    for step in bar:
        if deadline is not None and time.time() > deadline:
            bar.close()
            if ckpt is not None:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                state = dict(
                    run=run, step=step - 1, curve=curve, seconds=spent + time.time() - start, pieces=pieces,
                    model=model.state_dict(), optimizer=opt.state_dict(), schedule=sched.state_dict(),
                    generator=gen.get_state(), device_type=gen.device.type,
                )  # fmt: skip
                torch.save(state, ckpt.with_suffix(".tmp"))
                ckpt.with_suffix(".tmp").replace(ckpt)  # never a half-written checkpoint under the real name
            return None
        input_ids, labels, _ = mqar_mixture_batch(batch_size, seq_len, pairs, vocab_size, gen)
        with autocast:
            loss = answer_loss(model, input_ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            with autocast:
                acc, eval_loss = evaluate(model, eval_batches)
            curve.append({"step": step, "accuracy": acc, "loss": eval_loss})
            bar.set_postfix(acc=f"{acc:.3f}", loss=f"{loss.item():.3f}")
    input_ids, _, context = eval_batches[0]
    residuals = recall_residual(model.float(), input_ids[:16], positions=context[:16])
    row = {
        "model": name,
        "d_model": d_model,
        "seq_len": seq_len,
        "num_pairs": num_pairs,
        "lr": lr,
        "train_pairs": pairs,
        "accuracy": curve[-1]["accuracy"],
        "recall_residual": sum(r["recall_residual"] for r in residuals) / len(residuals),
        "write_residual": sum(r["write_residual"] for r in residuals) / len(residuals),
        "residuals_per_layer": residuals,
        "curve": curve,
        "steps": steps,
        "batch_size": batch_size,
        "vocab_size": vocab_size,
        "num_heads": num_heads,
        "seed": seed,
        "config_overrides": config_overrides,
        "preconditioner_config": settings,
        "seconds": round(spent + time.time() - start, 1),
        "pieces": pieces,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return row


def run_identity(name, d_model, seq_len, num_pairs, lr, steps, batch_size, vocab_size, num_heads, seed,
                 eval_every, pairs, settings) -> dict:  # fmt: skip
    """Everything that defines a training run, as saved with (and checked against) its checkpoint."""
    return dict(
        model=name, d_model=d_model, seq_len=seq_len, num_pairs=num_pairs, lr=lr, steps=steps,
        batch_size=batch_size, vocab_size=vocab_size, num_heads=num_heads, seed=seed, eval_every=eval_every,
        train_pairs=list(pairs), preconditioner_config=dict(settings),
    )  # fmt: skip


def _plan_checkpoint(args, job: tuple) -> str:
    """`checkpoint_name` of a planned run `(seq_len, num_pairs, d_model, lr, model, overrides)`."""
    L, P, d, lr, m, ov = job
    settings = preconditioner_config(OSDNConfig(**MODELS[m], **ov))
    ident = run_identity(m, d, L, P, lr, args.steps, args.batch_size, args.vocab_size, args.num_heads, args.seed,
                         args.eval_every, train_pairs(P, args.train_mix), settings)  # fmt: skip
    return checkpoint_name(ident)


def checkpoint_name(run: dict) -> str:
    """The file a run's training state is saved under: a digest of everything that defines the run."""
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:20] + ".pt"


def plot_settings(result: dict, png: Path) -> None:
    """A sweep over preconditioner settings: one bar per run, grouped by cell, labelled with its settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        result["rows"],
        key=lambda r: (r["seq_len"], r["d_model"], r["seed"], r["lr"], sorted(r["config_overrides"].items())),
    )
    labels = [
        f"{r['model']} {r['seq_len']}:{r['num_pairs']} d{r['d_model']} seed {r['seed']} lr {r['lr']:g}  "
        + " ".join(f"{k}={v:g}" for k, v in sorted(r["config_overrides"].items()))
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    cells = sorted({(r["seq_len"], r["d_model"], r["seed"]) for r in rows})
    colors = [f"C{cells.index((r['seq_len'], r['d_model'], r['seed']))}" for r in rows]
    ax.barh(range(len(rows)), [r["accuracy"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"MQAR preconditioner settings, {result['device']}, commit {result['commit'][:10]}", fontsize=9)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(result: dict, png: Path) -> None:
    """Best accuracy over learning rates against d_model, one panel per setting, one line per model,
    from the runs at OSDNConfig's current preconditioner defaults (`at_defaults`); a sweep over
    preconditioner settings (every row with overrides) gets `plot_settings` instead."""
    if result["rows"] and all(r.get("config_overrides") for r in result["rows"]):
        return plot_settings(result, png)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = len(result["rows"])
    result = {**result, "rows": at_defaults(result["rows"])}
    others -= len(result["rows"])
    best = best_runs(result["rows"])
    settings = sorted({(r["seq_len"], r["num_pairs"]) for r in result["rows"]})
    fig, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 7.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (L, P) in zip(axes[1], settings):  # learning curves: MQAR learns in a jump, so show when
        rows = [r for r in best if (r["seq_len"], r["num_pairs"]) == (L, P)]  # the runs of the panel above
        dims = sorted({r["d_model"] for r in rows})
        for r in rows:
            color = f"C{list(MODELS).index(r['model'])}"
            ax.plot(
                [c["step"] for c in r["curve"]],
                [c["accuracy"] for c in r["curve"]],
                color=color,
                linestyle=styles[dims.index(r["d_model"]) % len(styles)],
                label=f"{r['model']} d={r['d_model']} lr={r['lr']:g}",
            )
        ax.set_title(f"learning curves (best lr), seq {L}, {P} pairs")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    for ax, (L, P) in zip(axes[0], settings):
        for name in MODELS:
            rows = sorted(
                (r for r in best if r["model"] == name and (r["seq_len"], r["num_pairs"]) == (L, P)),
                key=lambda r: r["d_model"],
            )
            if rows:
                ax.plot([r["d_model"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
        ax.set_title(f"seq {L}, {P} pairs")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("accuracy (best lr)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    vocab = sorted({r["vocab_size"] for r in result["rows"]})
    defaults = ", ".join(f"{k}={v:g}" for k, v in settings_of("osdn").items())
    fig.suptitle(
        f"MQAR, vocabulary {vocab}, {result['device']}, commit {result['commit'][:10]}\nOSDN at the defaults "
        f"{defaults} ({others} runs at other settings not drawn)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MQAR sweep: OSDN, OSDN without APF and DeltaNet.")
    p.add_argument("--out", default="benchmarks/results/mqar.json")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--d-models", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--settings", nargs="+", default=[f"{L}:{P}" for L, P in SETTINGS], help="seq_len:num_pairs")
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-mix",
        type=int,
        default=1,
        help="train on this many pair counts (P, P/2, ..., at least 4), test on P; 1: P only",
    )
    p.add_argument("--precond-eta-init", type=float, nargs="+", help="sweep OSDNConfig.precond_eta_init")
    p.add_argument("--eta-max", type=float, nargs="+", help="sweep OSDNConfig.eta_max")
    p.add_argument("--apf-init", type=float, nargs="+", help="sweep OSDNConfig.apf_init (OSDN with APF only)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new runs after this many seconds")
    p.add_argument(
        "--deadline", type=float, default=None, help="abandon (do not record) a run still going after this many seconds"
    )
    p.add_argument(
        "--resume-dir",
        default=None,
        help="a run stopped by --deadline saves its training state here, and the next sweep with the same "
        "--resume-dir continues it (those runs first) instead of starting over",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="training processes, spread round-robin over the visible GPUs"
    )
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/n": the i-th of n workers' share of runs
    p.add_argument("--plot-only", action="store_true", help="only draw the PNG of --out")
    return p.parse_args(argv)


def _merge_shards(out: Path, shards: list[Path]) -> dict:
    """Fold the workers' shard files into `out` (rows new to it, by `_key`) and delete them."""
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    keys = {_key(r) for r in result["rows"]}
    for shard in shards:
        if shard.exists():
            part = json.loads(shard.read_text())
            # a worker's own command line is internal: `run_workers` records the sweep's
            result.update({k: v for k, v in part.items() if k not in ("rows", "command")})
            for r in part["rows"]:
                if _key(r) not in keys:
                    keys.add(_key(r))
                    result["rows"].append(r)
            shard.unlink()
    if result["rows"]:
        out.write_text(json.dumps(result, indent=1))
    return result


def run_workers(args, argv) -> dict:
    """Split the sweep over `--workers` processes (round-robin over GPUs), then merge their rows.

    Shards left by an earlier run that was killed before it merged are merged first, so their
    rows are kept and not run again.
    """
    out = Path(args.out)
    _merge_shards(out, sorted(out.parent.glob(f"{out.stem}.worker*.json")))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--workers")
    base = argv[:i] + argv[i + 2 :]
    procs, shards = [], []
    for w in range(args.workers):
        shard = out.with_name(f"{out.stem}.worker{w}.json")
        if out.exists():
            shard.write_text(out.read_text())  # the rows done so far, so no worker repeats them
        shards.append(shard)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[w % len(gpus)]
        cmd = [sys.executable, "-m", "osdn_hf.mqar", *base, "--out", str(shard), "--shard", f"{w}/{args.workers}"]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    result = _merge_shards(out, shards)
    result["command"] = command_line("scripts/mqar.py", argv)
    if result["rows"]:
        out.write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png"))
    if any(codes):
        raise RuntimeError(f"MQAR workers exited with codes {codes}")
    return result


def best_runs(rows: list[dict]) -> list[dict]:
    """The run with the best accuracy over learning rates of each model, setting and d_model."""
    best = {}
    for r in rows:
        cell = (r["model"], r["seq_len"], r["num_pairs"], r["d_model"])
        if cell not in best or r["accuracy"] > best[cell]["accuracy"]:
            best[cell] = r
    return list(best.values())


def preconditioner_config(config: OSDNConfig) -> dict:
    """All of `OVERRIDES` as `config` has them: what a row records and a checkpoint is named by."""
    return {k: getattr(config, k) for k in OVERRIDES}


def settings_of(model: str, overrides: dict | None = None) -> dict:
    """The preconditioner settings (`OVERRIDES`) that affect `model` when built with `overrides`:
    OSDNConfig's current defaults updated by them; DeltaNet has none."""
    settings = preconditioner_config(OSDNConfig(**MODELS[model], **(overrides or {})))
    return {k: v for k, v in settings.items() if k in RELEVANT[model]}


def row_settings(row: dict) -> dict:
    """The preconditioner settings a recorded run used (its `preconditioner_config`), restricted to
    those that affect its model, so that runs are told apart by what they ran with, also across a
    change of OSDNConfig's defaults."""
    if "preconditioner_config" not in row:
        raise ValueError(
            "MQAR row without 'preconditioner_config' (the settings it ran with): "
            f"{row['model']} d={row['d_model']} L={row['seq_len']} lr={row['lr']:g}"
        )
    return {k: v for k, v in row["preconditioner_config"].items() if k in RELEVANT[row["model"]]}


def at_defaults(rows: list[dict]) -> list[dict]:
    """The rows that ran with OSDNConfig's current preconditioner defaults."""
    defaults = {m: settings_of(m) for m in MODELS}
    return [r for r in rows if row_settings(r) == defaults[r["model"]]]


def _key(row: dict) -> tuple:
    return (
        row["model"],
        row["d_model"],
        row["seq_len"],
        row["num_pairs"],
        row["lr"],
        row["seed"],
        row["vocab_size"],
        row["steps"],
        tuple(row.get("train_pairs", [row["num_pairs"]])),
        tuple(sorted(row_settings(row).items())),
    )


def override_grid(args, model: str) -> list[dict]:
    """The preconditioner settings to run `model` with: the product of the values given for the
    fields that affect it (`RELEVANT`), each a valid OSDNConfig; `[{}]` (the defaults) if none."""
    axes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) and k in RELEVANT[model]}
    grid = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    valid = []
    for combo in grid:
        try:
            OSDNConfig(**combo)
        except ValueError as err:
            print(f"skipping {model} with {combo}: {err}")
            continue
        valid.append(combo)
    return valid if grid else [{}]


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.workers > 1 and not args.plot_only:
        return run_workers(args, argv)
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return json.loads(out.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result.update(run_metadata(args.commit, "scripts/mqar.py", argv))
    done = {_key(r) for r in result["rows"]}
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    grids = {m: override_grid(args, m) for m in args.models}  # once per model: it reports what it skips
    ran_with = {(m, i): settings_of(m, ov) for m in args.models for i, ov in enumerate(grids[m])}
    plan = [
        (L, P, d, lr, m, ov)
        for L, P in settings
        for d in args.d_models
        for lr in args.lrs
        for m in args.models
        for i, ov in enumerate(grids[m])
        if _key(
            dict(
                model=m, d_model=d, seq_len=L, num_pairs=P, lr=lr, seed=args.seed, vocab_size=args.vocab_size,
                steps=args.steps, train_pairs=train_pairs(P, args.train_mix), preconditioner_config=ran_with[m, i],
            )
        )
        not in done
    ]  # fmt: skip
    if args.resume_dir:  # runs with a saved state first, so that workers take one each
        started = {p.name for p in Path(args.resume_dir).glob("*.pt")}
        plan.sort(key=lambda job: _plan_checkpoint(args, job) not in started)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        plan = plan[i::n]
    start = time.time()
    deadline = None if args.deadline is None else start + args.deadline
    for L, P, d, lr, m, ov in tqdm(plan, desc="MQAR sweep"):
        if args.time_budget is not None and time.time() - start > args.time_budget:
            print(f"time budget reached: {len(plan)} planned, stopping; rerun to continue where this stopped")
            break
        row = train_one(
            m,
            d,
            L,
            P,
            lr,
            args.steps,
            args.batch_size,
            args.vocab_size,
            args.num_heads,
            args.seed,
            args.eval_every,
            device,
            progress=args.shard is None,
            deadline=deadline,
            train_mix=args.train_mix,
            config_overrides=ov,
            resume_dir=args.resume_dir,
        )
        if row is None:
            kept = f"its state is in {args.resume_dir}" if args.resume_dir else "not recorded"
            print(f"deadline reached during {m} d={d} L={L} lr={lr:g}: {kept}; rerun to continue")
            break
        result["rows"].append({**row, "commit": args.commit})  # the top-level commit is the last run's
        out.write_text(json.dumps(result, indent=1))  # partial results survive an interrupted sweep
        print(
            f"{m:12s} d={d:4d} L={L:5d} P={P:4d} lr={lr:g} {ov or ''}: acc {row['accuracy']:.3f}, "
            f"recall residual {row['recall_residual']:.3f}, "
            f"write residual {row['write_residual']:.3f}, {row['seconds']} s"
        )
    if result["rows"]:
        out.write_text(json.dumps(result, indent=1))
        if args.shard is None:  # a worker's share is plotted once merged
            plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
