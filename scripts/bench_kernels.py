"""Time OSDN's kernels against flash-linear-attention's DeltaNet, its preconditioned kernel and SDPA.

    python scripts/bench_kernels.py --out benchmarks/results/kernels.json --commit SHA
    python scripts/bench_kernels.py --plot-only benchmarks/results/kernels.json   # PNG from a JSON

One process, one GPU, bf16, H=16, K=V=128, (B, T) in (8, 2048), (4, 4096), (2, 8192),
(1, 16384): forward and forward+backward of `chunk_osdn`, fla's `chunk_delta_rule` (same q, k,
v, beta; the forward both with its inputs requiring gradients, as in training, and without
gradients, `*_fwd_nograd`, as in inference: ours takes a different phase-1 launch for each),
fla's `chunk_precond_gated_delta_rule` with zero gates and causal `scaled_dot_product_attention`,
timed with `triton.testing.do_bench` (median); ours and fla's
DeltaNet in `--rounds` alternating rounds, the order reversed every round (each figure is the
median over the rounds, the per-round values and ratios are kept), since fla's times moved by
half between separate runs and a drift of the machine should fall on both alike; peak memory of
each forward+backward; and one decoding step (B=1) of `fused_recurrent_osdn` (out of place and
in place) against fla's `fused_recurrent_delta_rule`, as whole-call time and as GPU time.
Ours, fla's DeltaNet and the forward of its preconditioned kernel are also given as GPU time
(`*_gpu_ms`: the kernels one call launches, without the host's time between them), since fla's
calls can take longer on the host than on the GPU, and then their `do_bench` times follow the
host.
Writes the JSON (schema in the kernels issue) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from osdn_hf.throughput import alternating_rounds, fwd_bwd_step, gpu_time_us, ratio_summary

SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384))
H, K, V = 16, 128, 128


def _peak_mib(fn, leaves) -> float:
    """Peak memory allocated while `fn` runs, above what was allocated before it. The leaves'
    gradients from earlier calls are dropped first. Until 79f9a87 they were counted in the base and
    freed inside `fn`, which left the gradients of q, k and v (192 MiB at 4 x 4096) out of both
    ops' peaks."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_row(B, T, do_bench, rounds=3):
    from fla.ops.delta_rule import chunk_delta_rule

    from osdn_hf.ops import chunk_osdn

    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(T)
    q, k, v = (torch.randn(B, T, H, D, device=dev, generator=g, dtype=dt).requires_grad_() for D in (K, K, V))
    beta, eta = (torch.rand(B, T, H, device=dev, generator=g, dtype=dt).requires_grad_() for _ in range(2))
    lam = (0.9 + 0.1 * torch.rand(B, T, H, device=dev, generator=g)).to(dt).requires_grad_()
    do = torch.randn(B, T, H, V, device=dev, generator=g, dtype=dt)
    row = dict(B=B, T=T, H=H, K=K, V=V)

    osdn = lambda: chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    fla = lambda: chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    steps = {
        "osdn_fwd": osdn,
        "fla_delta_fwd": fla,
        "osdn_fwd_nograd": torch.no_grad()(osdn),
        "fla_delta_fwd_nograd": torch.no_grad()(fla),
        "osdn_fwdbwd": fwd_bwd_step(osdn, (q, k, v, beta, eta, lam), do),
        "fla_delta_fwdbwd": fwd_bwd_step(fla, (q, k, v, beta), do),
    }
    ms, orders = alternating_rounds(steps, do_bench, rounds)
    row.update({f"{name}_ms": statistics.median(values) for name, values in ms.items()})
    row["rounds"] = dict(
        orders=orders,
        ms=ms,
        fwd_ratio=ratio_summary(ms["osdn_fwd"], ms["fla_delta_fwd"], "osdn / fla_delta"),
        fwd_nograd_ratio=ratio_summary(ms["osdn_fwd_nograd"], ms["fla_delta_fwd_nograd"], "osdn / fla_delta"),
        fwdbwd_ratio=ratio_summary(ms["osdn_fwdbwd"], ms["fla_delta_fwdbwd"], "osdn / fla_delta"),
    )
    # GPU time of what one call launches, without host time: fla's calls take longer on the host
    # than on the GPU at these sizes, so its do_bench times follow the host's speed and load
    for name, step in steps.items():
        row[f"{name}_gpu_ms"] = gpu_time_us(step, calls=5) / 1e3
    row["osdn_peak_mib"] = _peak_mib(steps["osdn_fwdbwd"], (q, k, v, beta, eta, lam))
    row["fla_delta_peak_mib"] = _peak_mib(steps["fla_delta_fwdbwd"], (q, k, v, beta, eta, lam))

    try:
        from fla.ops.precond_gated_delta_rule import chunk_precond_gated_delta_rule

        zeros = torch.zeros(B, T, H, device=dev, dtype=torch.float32)
        pre = lambda: chunk_precond_gated_delta_rule(q, k, v, zeros, zeros, beta, beta)[0]  # noqa: E731
        row["fla_precond_fwd_ms"] = do_bench(pre)
        # its do_bench time follows the host as fla DeltaNet's does (1.08 and 1.49 ms at 2 x 8192 in
        # two runs): the GPU time is what `osdn_fwd_gpu_ms` compares with
        row["fla_precond_fwd_gpu_ms"] = gpu_time_us(pre, calls=5) / 1e3
    except Exception as err:  # record why it did not run, keep benchmarking the rest
        row["fla_precond_fwd_ms"], row["fla_precond_fwd_error"] = None, f"{type(err).__name__}: {err}"[:300]
    try:
        row["fla_precond_fwdbwd_ms"] = (
            do_bench(fwd_bwd_step(pre, (q, k, v, beta), do)) if row["fla_precond_fwd_ms"] else None
        )
        if row["fla_precond_fwdbwd_ms"] is None:
            row["fla_precond_fwdbwd_error"] = "forward did not run"
    except Exception as err:
        row["fla_precond_fwdbwd_ms"], row["fla_precond_fwdbwd_error"] = None, f"{type(err).__name__}: {err}"[:300]

    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, H, T, D)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
    row["sdpa_fwd_ms"] = do_bench(sdpa)
    row["sdpa_fwdbwd_ms"] = do_bench(fwd_bwd_step(sdpa, (qs, ks, vs), do.transpose(1, 2).contiguous()))
    return row


def bench_decode(do_bench, rounds=5):
    """One decoding step (B=1). `*_us` is `do_bench` of a whole call, which for a step this small
    is mostly host time (checks, allocation, launch): the median of `rounds` alternating rounds
    (the per-round values are kept under "rounds"; one call of do_bench moved by several times
    within a run: 26 us out of place and 94 in place at 8944972). `*_gpu_us` is the GPU time of
    what the call launches. `osdn_inplace_*` updates the states in place, as the model's cached
    decoding does."""
    from fla.ops.delta_rule import fused_recurrent_delta_rule

    from osdn_hf.ops import fused_recurrent_osdn

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 1, H, D, device=dev, dtype=dt) for D in (K, K, V))
    beta, eta, lam = (torch.rand(1, 1, H, device=dev, dtype=dt) for _ in range(3))
    S = torch.randn(1, H, K, V, device=dev)
    d = torch.ones(1, H, K, device=dev)
    S_cache, d_cache = S.clone(), d.clone()
    args, norm = (q, k, v, beta, eta, lam), dict(use_qk_l2norm_in_kernel=True)
    calls = {
        "osdn": lambda: fused_recurrent_osdn(
            *args, initial_state=S, initial_precond=d, output_final_state=True, **norm
        ),
        "osdn_inplace": lambda: fused_recurrent_osdn(
            *args, initial_state=S_cache, initial_precond=d_cache, inplace_final_state=True, **norm
        ),
        "fla_delta": lambda: fused_recurrent_delta_rule(
            q, k, v, beta, initial_state=S, output_final_state=True, use_qk_l2norm_in_kernel=True
        ),
    }
    out = {}
    with torch.no_grad():
        us, orders = alternating_rounds(calls, lambda fn: 1e3 * do_bench(fn), rounds)
        for name, fn in calls.items():
            out[f"{name}_us"] = statistics.median(us[name])
            out[f"{name}_gpu_us"] = gpu_time_us(fn)
    out["rounds"] = dict(orders=orders, us=us)
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['B']}x{r['T']}" for r in rows]
    titles = dict(fwd="forward", fwd_nograd="forward without gradients", fwdbwd="forward + backward")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, kind in zip(axes, titles):
        for name, key, color in (
            ("OSDN", "osdn", "C0"),
            ("fla DeltaNet", "fla_delta", "C1"),
            ("fla precond", "fla_precond", "C2"),
            ("SDPA", "sdpa", "C3"),
        ):
            # solid: do_bench's median; dashed: GPU time, where the run has it. One colour a kernel
            # in both panels, also where one has no figures for it (fla precond's backward refuses)
            for suffix, style, what in (("ms", "-", "do_bench"), ("gpu_ms", "--", "GPU time")):
                ys = [r.get(f"{key}_{kind}_{suffix}") for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(
                        labels, [float("nan") if y is None else y for y in ys], style, marker="o",
                        color=color, label=f"{name} ({what})",
                    )  # fmt: skip
        ax.set_title(f"{titles[kind]} (bf16, H={H}, K=V={K})", fontsize=10)
        ax.set_xlabel("B x T (16K tokens per batch)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--plot-only", metavar="JSON", help="only draw the PNG of an existing result")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and fla's DeltaNet")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    from tqdm import tqdm
    from triton.testing import do_bench as _do_bench

    from osdn_hf.ops.osdn.tuning import launch_settings
    from osdn_hf.run_info import run_metadata

    do_bench = lambda fn: _do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    # Other work on the host (compiles beside the run) moved fla's times once: the load is kept
    load_before = os.getloadavg()[0]
    rows = [bench_row(B, T, do_bench, args.rounds) for B, T in tqdm(SHAPES, desc="kernel benchmark")]
    result = dict(
        **run_metadata(args.commit, "scripts/bench_kernels.py", argv),
        fla=__import__("fla").__version__,
        dtype="bfloat16",
        launch=launch_settings(),
        host_load_1min=dict(before=load_before, after=os.getloadavg()[0], cpus=os.cpu_count()),
        rows=rows,
        decode=bench_decode(do_bench, max(args.rounds, 5)),
    )
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{'B x T':>10} {'osdn fwd':>9} {'fla fwd':>8} {'ratio':>6} "
        f"{'osdn f+b':>9} {'fla f+b':>8} {'ratio':>6} {'mem ratio':>9} {'GPU-time ratio f, f+b':>22}"
        "  f+b ratio per round"
    )
    for r in rows:
        print(
            f"{r['B']:>3} x {r['T']:<5} {r['osdn_fwd_ms']:9.3f} {r['fla_delta_fwd_ms']:8.3f} "
            f"{r['osdn_fwd_ms'] / r['fla_delta_fwd_ms']:6.2f} "
            f"{r['osdn_fwdbwd_ms']:9.3f} {r['fla_delta_fwdbwd_ms']:8.3f} "
            f"{r['osdn_fwdbwd_ms'] / r['fla_delta_fwdbwd_ms']:6.2f} "
            f"{r['osdn_peak_mib'] / r['fla_delta_peak_mib']:9.2f} "
            f"{r['osdn_fwd_gpu_ms'] / r['fla_delta_fwd_gpu_ms']:16.2f} "
            f"{r['osdn_fwdbwd_gpu_ms'] / r['fla_delta_fwdbwd_gpu_ms']:5.2f}  "
            + " ".join(f"{x:.2f}" for x in r["rounds"]["fwdbwd_ratio"]["per_round"])
        )
    for r in rows:
        print(
            f"{r['B']:>3} x {r['T']:<5} forward without gradients: osdn {r['osdn_fwd_nograd_ms']:.3f} ms, "
            f"fla {r['fla_delta_fwd_nograd_ms']:.3f} ms "
            f"({r['osdn_fwd_nograd_ms'] / r['fla_delta_fwd_nograd_ms']:.2f}); "
            f"GPU time {r['osdn_fwd_nograd_gpu_ms']:.3f} and {r['fla_delta_fwd_nograd_gpu_ms']:.3f} ms "
            f"({r['osdn_fwd_nograd_gpu_ms'] / r['fla_delta_fwd_nograd_gpu_ms']:.2f})"
        )
    for r in rows:
        if r.get("fla_precond_fwd_gpu_ms"):
            print(
                f"{r['B']:>3} x {r['T']:<5} GPU time of the forward: osdn {r['osdn_fwd_gpu_ms']:.3f} ms, "
                f"fla precond {r['fla_precond_fwd_gpu_ms']:.3f} ms"
            )
    print("decode:", {k: round(v, 2) for k, v in result["decode"].items() if k != "rounds"})
    try:
        plot(result, Path(args.out).with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: draw the PNG later with --plot-only")


if __name__ == "__main__":
    main()
