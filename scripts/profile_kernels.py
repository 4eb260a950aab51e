"""Profile `chunk_osdn` forward and backward on the GPU: the CUDA kernels that take the time.

    python scripts/profile_kernels.py --B 4 --T 4096            # per-kernel CUDA time
    python scripts/profile_kernels.py --tune --out tune.json    # launch settings, one knob at a time

`--tune` times forward+backward (`triton.testing.do_bench`, median) while it varies the scans'
launch settings (`chunk_fused.SCAN_TUNING`) and the per-chunk kernels' warps (`CHUNK_WARPS`), one
knob at a time from the defaults, and prints and writes the times; nothing is changed in place.
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from osdn_hf.ops import chunk_osdn
from osdn_hf.ops.osdn import chunk_fused
from osdn_hf.run_info import run_metadata


def _step(B, T, H, D):
    """One forward+backward of `chunk_osdn` on random bf16 inputs, as a closure."""
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    beta, eta, lam = (torch.rand(B, T, H, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    return lambda: chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0].backward(do)


def tune(step, args) -> dict:
    import triton

    base = {name: dict(t) for name, t in chunk_fused.SCAN_TUNING.items()}
    trials = [("default", None, None)]
    for name in base:
        knobs = dict(num_warps=(2, 4, 8), num_stages=(1, 2, 3), BS=(16, 32, 64))
        if name.startswith("state"):
            knobs["BV"] = (16, 32, 64)
        for knob, values in knobs.items():
            trials += [(name, knob, value) for value in values]
    trials += [("chunk_warps", "num_warps", w) for w in (2, 4, 8)]
    rows = []
    for name, knob, value in tqdm(trials, desc="launch settings"):
        chunk_fused.SCAN_TUNING.update({n: dict(t) for n, t in base.items()})
        warps = chunk_fused.CHUNK_WARPS
        if name == "chunk_warps":
            chunk_fused.CHUNK_WARPS = value
        elif name != "default":
            chunk_fused.SCAN_TUNING[name][knob] = value
        try:
            ms, err = triton.testing.do_bench(step), None
        except Exception as e:  # a setting that does not fit (registers, shared memory) is recorded
            ms, err = None, f"{type(e).__name__}: {e}"[:200]
        chunk_fused.CHUNK_WARPS = warps
        rows.append(dict(kernel=name, knob=knob, value=value, fwdbwd_ms=ms, error=err))
        print(f"{name:12s} {knob or '':10s} {value if value is not None else '':>4} {ms or err}")
    chunk_fused.SCAN_TUNING.update(base)
    return dict(
        **run_metadata(args.commit),
        shape=dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, dtype="bfloat16"),
        defaults=base,
        rows=rows,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--tune", action="store_true", help="time launch settings instead of profiling")
    p.add_argument("--out", help="with --tune: write the times here (JSON)")
    p.add_argument("--commit", default="unknown")
    args = p.parse_args(argv)
    step = _step(args.B, args.T, args.H, args.D)
    if args.tune:
        result = tune(step, args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
