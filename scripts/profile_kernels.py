"""Profile `chunk_osdn` forward and backward on the GPU: the CUDA kernels that take the time.

    python scripts/profile_kernels.py --B 4 --T 4096            # per-kernel CUDA time
    python scripts/profile_kernels.py --tune --out tune.json    # scan launch settings, one knob at a time
    python scripts/profile_kernels.py --grid --out grid.json    # per-chunk kernels: warps x tile
    python scripts/profile_kernels.py --peer --out peer.json    # ours and fla's DeltaNet, kernel by kernel
    python scripts/profile_kernels.py --plot-only peer.json     # its PNG (peer.png; a --grid JSON too)
    ncu --profile-from-start off --csv --page details --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python scripts/profile_kernels.py --ncu-step > ncu.csv
    python scripts/profile_kernels.py --ncu-json ncu.csv --out ncu.json   # per kernel: its metrics

`--tune` times forward+backward (`triton.testing.do_bench`, median) while it varies the scans'
launch settings (`tuning.SCAN_TUNING`), one knob at a time from the defaults, and prints
and writes the times; `--only state_fwd ...` limits it to those scans. `--grid` profiles one
forward+backward at every (num_warps, tile) setting of the per-chunk kernels
(`tuning.CHUNK_LAUNCH`, all kernels alike in each profile), each setting in a fresh process
so that one that faults costs only itself (its error, naming the failed launch, is recorded),
and reports each kernel's CUDA time per setting and its fastest. `--peer` profiles one
forward+backward of ours and of fla's `chunk_delta_rule` on the same inputs in the same
process and lists both sets of kernels with their CUDA times (each kernel's total over its
calls), to show where the difference lies, and draws them grouped by what they do (`peer.png`
beside `peer.json`).
Nothing is changed in place.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys

import torch
from tqdm import tqdm

from osdn_hf.ops import chunk_osdn
from osdn_hf.ops.osdn import tuning
from osdn_hf.run_info import run_metadata
from osdn_hf.throughput import cuda_profile, fwd_bwd_step


def _step(B, T, H, D, peer=False, V=None):
    """One forward+backward of `chunk_osdn` on random bf16 inputs, as a closure; with `peer`, of
    fla's DeltaNet (`chunk_delta_rule`, the peer of `scripts/bench_kernels.py`) on the same kind.
    Values are `V` wide (default D)."""
    dt, V = torch.bfloat16, V or D
    q, k = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=dt, requires_grad=True)
    beta, eta, lam = (torch.rand(B, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, V, device="cuda", dtype=dt)
    if peer:
        from fla.ops.delta_rule import chunk_delta_rule

        fwd = lambda: chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    else:
        fwd = lambda: chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731

    return fwd_bwd_step(fwd, (q, k, v, beta, eta, lam), do)


def peer(step, args, meta: dict) -> dict:
    """Per-kernel CUDA time (us) of one forward+backward of ours and of fla's DeltaNet; with
    `args.narrow_v`, also of fla's DeltaNet with values that wide. Phase 1 is a delta rule on a
    `K x 1` state, so how a delta rule's cost falls with its values' width estimates what phase 1
    would cost in kernels as good as fla's (phase 1 also has its decay and its output W)."""
    ours, theirs = kernel_times(step), kernel_times(_step(args.B, args.T, args.H, args.D, peer=True))
    runs = [("chunk_osdn", ours), ("fla chunk_delta_rule", theirs)]
    narrow = {}
    for width in getattr(args, "narrow_v", None) or ():
        try:
            narrow[width] = kernel_times(_step(args.B, args.T, args.H, args.D, peer=True, V=width))
        except Exception as err:  # a width fla's kernels refuse is recorded, the others still run
            narrow[width] = f"{type(err).__name__}: {err}"[:300]
            print(f"fla chunk_delta_rule, V={width}: {narrow[width]}")
            continue
        runs.append((f"fla chunk_delta_rule, V={width}", narrow[width]))
    for name, times in runs:
        print(f"{name}: {sum(times.values()):.0f} us in all")
        for kernel, us in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"  {us:8.1f}  {kernel[:90]}")
    extra = {}
    if narrow:
        extra = dict(
            fla_delta_narrow_v_us={str(w): t for w, t in narrow.items()},
            fla_delta_narrow_v_total_us={
                str(w): sum(t.values()) if isinstance(t, dict) else None for w, t in narrow.items()
            },
        )
    return dict(
        **extra,
        **meta,
        shape=dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, dtype="bfloat16"),
        osdn_us=ours,
        fla_delta_us=theirs,
        osdn_total_us=sum(ours.values()),
        fla_delta_total_us=sum(theirs.values()),
    )


# What each kernel does, by name: (group, substrings of the kernels in it), first match wins.
GROUPS = (
    ("phase 1: preconditioner", ("pre_intra", "pre_out", "pre_y", "precond_")),
    (
        "delta rule: WY/UT, states, outputs",
        ("wy_", "kb_kernel", "out_", "state_", "chunk_", "recompute_w_u", "prepare_wy", "merge_16x16", "solve_tril"),
    ),
    ("relayout, L2 norm of q and k", ("to_chunks", "from_chunks", "l2norm")),
    ("float32 to bf16 casts", ("bfloat16_copy",)),
    ("bf16 adds (fla: inside its op)", ("CUDAFunctor_add<c10::BFloat16>",)),
)


def grouped(times: dict) -> dict:
    """Kernel times (us) summed by `GROUPS`, the rest as 'other'."""
    out = {name: 0.0 for name, _ in GROUPS} | {"other": 0.0}
    for kernel, us in times.items():
        group = next((name for name, keys in GROUPS if any(k in kernel for k in keys)), "other")
        out[group] += us
    return out


def plot_peer(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {"chunk_osdn": grouped(result["osdn_us"]), "fla chunk_delta_rule": grouped(result["fla_delta_us"])}
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for i, groups in enumerate(bars.values()):
        left = 0.0
        for j, (group, us) in enumerate(groups.items()):
            ax.barh(i, us, left=left, color=f"C{j}", label=group if i == 0 else None)
            if us > 150:
                ax.text(left + us / 2, i, f"{us:.0f}", ha="center", va="center", fontsize=8, color="white")
            left += us
        ax.text(left + 30, i, f"{left:.0f} us", va="center", fontsize=9)
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set_xlabel("CUDA time of one forward+backward, summed per kernel (us)")
    shape = result["shape"]
    ax.set_title(
        f"B={shape['B']} T={shape['T']} H={shape['H']} K=V={shape['K']} {shape['dtype']}; "
        f"{result['device']}, commit {result['commit'][:10]}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_xlim(0, max(sum(g.values()) for g in bars.values()) * 1.15)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def plot_grid(result: dict, png: str) -> None:
    """A `--grid` result as a heat map: each kernel's CUDA time at every setting, relative to its
    time at its own `CHUNK_LAUNCH` setting (settings that faulted are marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(dict.fromkeys((r["num_warps"], r["tile"]) for r in result["rows"]))
    kernels = list(dict.fromkeys(r["kernel"] for r in result["rows"]))
    us = {(r["kernel"], r["num_warps"], r["tile"]): r["us"] for r in result["rows"]}
    rel = np.full((len(kernels), len(settings)), np.nan)
    for i, name in enumerate(kernels):
        own = result["defaults"][name]  # None in the table: 4 warps, and no tile (the grid's 16)
        base = us.get((name, own["num_warps"] or 4, own["tile"] or 16))
        for j, (w, t) in enumerate(settings):
            if base and us.get((name, w, t)) is not None:
                rel[i, j] = us[(name, w, t)] / base
    fig, ax = plt.subplots(figsize=(1.3 * len(settings) + 3, 0.38 * len(kernels) + 1.6))
    im = ax.imshow(np.log2(rel), cmap="RdYlGn_r", vmin=-1, vmax=1, aspect="auto")
    for i, name in enumerate(kernels):
        for j, (w, t) in enumerate(settings):
            x = us.get((name, w, t))
            ax.text(j, i, "fault" if x is None else f"{x:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(settings)), [f"{w} warps\ntile {t}" for w, t in settings], fontsize=8)
    ax.set_yticks(range(len(kernels)), kernels, fontsize=8)
    shape = result["shape"]
    ax.set_title(
        f"CUDA us per kernel (colour: vs its own setting, log2); B={shape['B']} T={shape['T']} "
        f"K=V={shape['K']} {shape['dtype']}; {result['device']}, {result['commit'][:10]}",
        fontsize=8,
    )
    fig.colorbar(im, ax=ax, label="log2(time / time at own setting)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def tune(step, args, meta: dict) -> dict:
    import triton

    base = {name: dict(t) for name, t in tuning.SCAN_TUNING.items()}
    trials = [("default", None, None)]
    for name in base:
        knobs = dict(num_warps=(2, 4, 8), num_stages=(1, 2, 3), BS=(16, 32, 64))
        if name.startswith("state"):
            knobs["BV"] = (16, 32, 64)
        # whole chunks with the next one loaded ahead, or not, at 4 and at 8 warps
        default = (base[name]["prefetch"], base[name]["num_warps"])
        knobs[("prefetch", "num_warps")] = tuple(x for x in itertools.product((False, True), (4, 8)) if x != default)
        if name == "precond_bwd":  # the scan split from the rows' gradients, at 4 and at 8 warps
            split = args.B * args.H < base[name]["split_below"]  # as the default has it at this size
            knobs[("split_below", "split_num_warps")] = ((0, 4),) if split else ((1 << 30, 4), (1 << 30, 8))
        for knob, values in knobs.items():
            trials += [(name, knob, value) for value in values]
    if args.only:
        trials = [t for t in trials if t[0] in ("default", *args.only)]
    if args.knobs:  # knob names as written in --knobs: "num_warps", "prefetch,num_warps"
        trials = [
            t
            for t in trials
            if t[0] == "default" or ",".join(t[1] if isinstance(t[1], tuple) else [t[1]]) in args.knobs
        ]
    rows = []
    for name, knob, value in tqdm(trials, desc="launch settings"):
        tuning.SCAN_TUNING.update({n: dict(t) for n, t in base.items()})
        if name != "default":
            pairs = zip(knob, value) if isinstance(knob, tuple) else [(knob, value)]
            tuning.SCAN_TUNING[name].update(pairs)
        try:
            ms, err = triton.testing.do_bench(step), None
        except Exception as e:  # a setting that does not fit (registers, shared memory) is recorded
            ms, err = None, f"{type(e).__name__}: {e}"[:200]
        rows.append(dict(kernel=name, knob=knob, value=value, fwdbwd_ms=ms, error=err))
        print(f"{name:12s} {str(knob or ''):10s} {str(value) if value is not None else '':>4} {ms or err}")
    tuning.SCAN_TUNING.update(base)
    return dict(
        **meta,
        shape=dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, dtype="bfloat16"),
        defaults=base,
        rows=rows,
    )


def kernel_times(step) -> dict:
    """CUDA time (us) of every kernel in one call of `step`, after three untimed calls."""
    return {
        e.key: e.self_device_time_total
        for e in cuda_profile(step, warmup=3).key_averages()
        if e.self_device_time_total > 0
    }


GRID = [(w, t) for w in (4, 8) for t in (16, 32, 64)]  # per-chunk (num_warps, tile) settings timed by --grid
GRID_MARK = "GRID_TIMES "  # the line a --grid-one child prints its kernel times on


def grid_setting(setting: tuple, args, gpu: int | None = None) -> tuple[dict, str | None]:
    """CUDA time (us) of every kernel of one forward+backward with all per-chunk kernels at
    `setting` = (num_warps, tile), profiled in a fresh process (on GPU `gpu` where given), so
    that a setting that faults (an illegal memory access leaves the process's CUDA context
    unusable) costs only itself. On a failure, the setting runs once more with
    CUDA_LAUNCH_BLOCKING=1, whose error names the launch that failed; the error's last lines are
    returned instead of times."""
    cmd = [sys.executable, __file__, "--grid-one", "{},{}".format(*setting)]
    cmd += ["--B", str(args.B), "--T", str(args.T), "--H", str(args.H), "--D", str(args.D)]
    env = dict(os.environ)
    if gpu is not None:  # the gpu-th of the GPUs this process sees
        visible = [x for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode == 0:
        line = next(x for x in run.stdout.splitlines()[::-1] if x.startswith(GRID_MARK))
        return json.loads(line[len(GRID_MARK) :]), None
    again = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, CUDA_LAUNCH_BLOCKING="1"))
    tail = (again.stderr or run.stderr).strip().splitlines()[-12:]
    return {}, f"exit {run.returncode}: " + "\n".join(tail)[-1500:]


def grid(args, meta: dict, measure=grid_setting) -> dict:
    """Each per-chunk kernel's CUDA time at every `GRID` setting (all kernels alike in each
    profile, one process per setting: `measure`), and its fastest. With `args.gpus` = N > 1 the
    settings run N at a time, one process per GPU (the compiling, most of each setting's time,
    is CPU work), and are recorded in `GRID`'s order."""
    from concurrent.futures import ThreadPoolExecutor
    from queue import Queue

    names = list(tuning.CHUNK_LAUNCH)
    n = getattr(args, "gpus", 1)
    free = Queue()
    for gpu in range(n):
        free.put(gpu)

    def on_a_free_gpu(setting):
        if n == 1:
            return measure(setting, args)
        gpu = free.get()
        try:
            return measure(setting, args, gpu)
        finally:
            free.put(gpu)

    rows = []
    with ThreadPoolExecutor(n) as pool:
        results = pool.map(on_a_free_gpu, GRID)
        for (warps, tile), (times, err) in tqdm(zip(GRID, results), total=len(GRID), desc="per-chunk settings"):
            for name in names:
                rows.append(dict(kernel=name, num_warps=warps, tile=tile, us=times.get(f"{name}_kernel"), error=err))
            print(f"warps {warps} tile {tile}: total {sum(times.values()):.0f} us", err or "", flush=True)
            if args.out:  # as it goes: a run cut short keeps the settings it reached
                with open(args.out, "w") as f:
                    json.dump(dict(**meta, rows=rows), f)
    best = {}
    for name in names:
        timed = [r for r in rows if r["kernel"] == name and r["us"] is not None]
        if timed:
            b = min(timed, key=lambda r: r["us"])
            best[name] = dict(num_warps=b["num_warps"], tile=b["tile"], us=b["us"])
            print(f"{name:16s} fastest: warps {b['num_warps']} tile {b['tile']:2d}  {b['us']:8.1f} us")
    return dict(
        **meta,
        shape=dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, dtype="bfloat16"),
        defaults={name: dict(t) for name, t in tuning.CHUNK_LAUNCH.items()},
        rows=rows,
        fastest=best,
    )


def ncu_step(args) -> None:
    """One forward+backward of ours, then one of fla's DeltaNet, each after an unprofiled call,
    between cudaProfilerStart and Stop: what `ncu --profile-from-start off` profiles."""
    for peer in (False, True):
        step = _step(args.B, args.T, args.H, args.D, peer=peer)
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def ncu_json(csv_path: str, meta: dict) -> dict:
    """`ncu --csv --page details` output as JSON: one entry per profiled launch, in launch order,
    with its name, block and grid, and every metric as {section: {metric: [value, unit]}}."""
    import csv

    with open(csv_path) as f:
        lines = f.read().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith('"ID"'))  # ncu's own lines come first
    launches = {}
    for r in csv.DictReader(lines[start:]):
        launch = launches.setdefault(
            r["ID"], dict(kernel=r["Kernel Name"], block=r["Block Size"], grid=r["Grid Size"], sections={})
        )
        launch["sections"].setdefault(r["Section Name"], {})[r["Metric Name"]] = [r["Metric Value"], r["Metric Unit"]]
    return dict(**meta, launches=list(launches.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--tune", action="store_true", help="time launch settings instead of profiling")
    p.add_argument("--grid", action="store_true", help="time the per-chunk kernels at every warps x tile setting")
    p.add_argument("--peer", action="store_true", help="profile ours and fla's DeltaNet side by side")
    p.add_argument("--out", help="with --tune, --grid or --peer: write the times here (JSON)")
    p.add_argument(
        "--only", nargs="+", help="with --tune: only these scans (precond_fwd precond_bwd state_fwd state_bwd)"
    )
    p.add_argument("--knobs", nargs="+", help="with --tune: only these knobs (a pair as 'prefetch,num_warps')")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--plot-only", metavar="JSON", help="only draw the PNG of an existing --peer or --grid result")
    p.add_argument("--gpus", type=int, default=1, help="with --grid: run the settings this many at a time, one a GPU")
    p.add_argument("--narrow-v", type=int, nargs="+", help="with --peer: also fla's DeltaNet with values this wide")
    p.add_argument("--ncu-step", action="store_true", help="the step to run under ncu (see above)")
    p.add_argument("--ncu-json", metavar="CSV", help="turn ncu's CSV (see above) into JSON at --out")
    p.add_argument("--grid-one", help=argparse.SUPPRESS)  # "warps,tile": a --grid child's one setting
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus must be >= 1, got {args.gpus}")
    if any(w < 1 for w in args.narrow_v or ()):
        p.error(f"--narrow-v widths must be >= 1, got {args.narrow_v}")
    if args.plot_only:
        with open(args.plot_only) as f:
            result = json.load(f)
        (plot_grid if "fastest" in result else plot_peer)(result, args.plot_only.removesuffix(".json") + ".png")
        return
    if args.ncu_step:
        ncu_step(args)
        return
    if args.ncu_json:
        meta = run_metadata(args.commit, "scripts/profile_kernels.py", argv)
        meta.update(shape=dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, dtype="bfloat16"))
        with open(args.out, "w") as f:
            json.dump(ncu_json(args.ncu_json, meta), f, indent=1)
        return
    if args.grid_one:
        warps, tile = (int(x) for x in args.grid_one.split(","))
        for launch in tuning.CHUNK_LAUNCH.values():
            launch.update(num_warps=warps, tile=tile)
            launch.pop("tile_v", None)  # every block at `tile`, out_fwd's V block too
        print(GRID_MARK + json.dumps(kernel_times(_step(args.B, args.T, args.H, args.D))), flush=True)
        return
    if args.tune or args.grid or args.peer:
        meta = dict(run_metadata(args.commit, "scripts/profile_kernels.py", argv), launch=tuning.launch_settings())
        if args.grid:
            result = grid(args, meta)
        else:
            result = (tune if args.tune else peer)(_step(args.B, args.T, args.H, args.D), args, meta)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            if args.peer or args.grid:
                (plot_peer if args.peer else plot_grid)(result, args.out.removesuffix(".json") + ".png")
        return
    step = _step(args.B, args.T, args.H, args.D)
    print(
        cuda_profile(step, warmup=3)
        .key_averages()
        .table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    )


if __name__ == "__main__":
    main()
