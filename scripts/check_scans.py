"""Check phase 2's state scans alone, launch by launch, against the float32 torch loop at few chunks.

    python scripts/check_scans.py --heads 16 --out benchmarks/results/scans_check.json --commit SHA
    python scripts/check_scans.py --tile '{"BV": 16, "BS": 64, "num_stages": 3, "PREFETCH": false}'

The op's checks (`check_kernels.py`) see a scan only through the launch the package picks for the
shapes they run. This runs `chunk_fused._state_scan` (writing U, then rebuilding the per-chunk
states from it) and `chunk_fused._state_scan_bwd` on random inputs, for every head-dim pair, chunk
count NC and dtype, at the launch the package gives the pair for `--heads` scans on this device
(on a GPU it depends on that count: `chunk_fused._scan_launch` fits it to the SMs, so run it at
several) and at each `--tile` (launch keys over it; a tile that does not fit a pair's K is
skipped). It compares U, the per-chunk states, the final state, and the gradients of Kb, W, Ub
and the initial state with `chunk_scan.state_scan_torch` and its autograd gradients in float32
on the same rounded inputs, by max |a - b| / max |b|. The rebuilt states must equal the first
ones bit for bit.

Each (pair, dtype) runs in a process of its own, `--jobs` at once: a launch that faults the GPU
ends only its own group (recorded with the error). On CPU it runs through Triton's interpreter
(set by the script), which is exact for float32 and float16 only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

C = 64  # chunk_osdn's chunk size
RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
RTOL_TF32 = 1e-2  # float32 with --tf32: float16's (tf32 rounds each product's operands as float16 does)
PAIRS = ("32x32", "64x64", "64x32", "100x48", "128x128", "256x256")


def make_scan_inputs(N: int, NC: int, K: int, V: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Kb, W `[N, 1, NC, C, K]` and Ub `[N, 1, NC, C, V]` in `dtype`, S0 `[N, 1, K, V]` float32,
    and the cotangents of U, the per-chunk states (both `dtype`) and the final state (float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    return dict(
        kb=r(N, 1, NC, C, K, scale=0.1).to(dtype),
        w=r(N, 1, NC, C, K, scale=0.1).to(dtype),
        ub=r(N, 1, NC, C, V).to(dtype),
        s0=r(N, 1, K, V),
        gu=r(N, 1, NC, C, V).to(dtype),
        gss=r(N, 1, NC, K, V).to(dtype),
        gsf=r(N, 1, K, V),
    )


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def scan_precision(dtype: torch.dtype, tf32: bool) -> str:
    """The scans' product precision for inputs of `dtype`: as the op picks it (`dot_precision`), or
    tf32 with `tf32` (float32 inputs under torch's TF32)."""
    from osdn_hf.ops.osdn.utils import dot_precision

    return "tf32" if tf32 else dot_precision(torch.empty(0, dtype=dtype))


def check_case(
    K: int, V: int, NC: int, dtype: torch.dtype, launches: dict, heads: int, device: str, tf32: bool = False
) -> dict:
    """One case: the scans at `launches` (`{"state_fwd": ..., "state_bwd": ...}`) against the loop;
    with `tf32`, the scans' products in tf32 whatever the dtype (float32 inputs under torch's TF32)."""
    from osdn_hf.ops.osdn import chunk_fused
    from osdn_hf.ops.osdn.chunk_scan import state_scan_torch

    x = make_scan_inputs(heads, NC, K, V, dtype, device, seed=NC)
    precision = scan_precision(dtype, tf32)
    uo = torch.empty_like(x["ub"])
    ss, sf = chunk_fused._state_scan(x["kb"], x["w"], x["ub"], x["s0"], uo, precision, launches["state_fwd"])
    rebuilt, _ = chunk_fused._state_scan(None, x["w"], None, x["s0"], uo, precision, launches["state_fwd"])
    dub, dss, ds0 = chunk_fused._state_scan_bwd(
        x["kb"], x["w"], x["gu"], x["gss"].clone(), x["gsf"], precision, launches["state_bwd"]
    )
    # dKb and dW as the op makes them from the reverse scan's outputs (state_grads_kernel)
    dkb = -dub.float() @ ss.float().transpose(-1, -2)
    dw = uo.float() @ dss.float().transpose(-1, -2)

    ref_in = {n: x[n].float().requires_grad_() for n in ("kb", "w", "ub", "s0")}
    us, ss_ref, sf_ref = state_scan_torch(**ref_in)
    cot = (x["gu"].float(), x["gss"].float(), x["gsf"])
    grads = torch.autograd.grad((us, ss_ref, sf_ref), list(ref_in.values()), cot)
    errors = {
        "U": max_rel(uo, us),
        "S_starts": max_rel(ss, ss_ref),
        "S_final": max_rel(sf, sf_ref),
        "dKb": max_rel(dkb, grads[0]),
        "dW": max_rel(dw, grads[1]),
        "dUb": max_rel(dub, grads[2]),
        "dS0": max_rel(ds0, grads[3]),
    }
    return dict(errors=errors, rebuilt_same_bits=bool(torch.equal(rebuilt, ss)))


def launches_for(
    K: int, V: int, tile: dict | None, heads: int, device: str, float32: bool = False, precision: str = "ieee"
) -> dict | None:
    """The package's launches for the pair at `heads` scans on `device` (on a GPU, fitted to its
    SMs, to the storage dtype (16-bit or `float32`) and to the products' `precision`:
    `chunk_fused._scan_launch`), or `tile`'s keys over them: over both scans', or
    `{"state_fwd": {...}, "state_bwd": {...}}` for each its own. None where the tile does not fit
    (PREFETCH needs BS == C and a K block of at most 128; BS must divide C)."""
    from osdn_hf.ops.osdn import chunk_fused

    out = {
        n: chunk_fused._scan_launch(n, K, V, C, heads, device, float32, precision) for n in ("state_fwd", "state_bwd")
    }
    if tile is None:
        return out
    for name, launch in out.items():
        launch.update(tile.get(name, {}) if set(tile) & set(out) else tile)
        if launch.get("PREFETCH") and (launch["BS"] != C or launch["BK"] > 128):
            return None
        if C % launch["BS"]:
            return None
    return out


def run_group(pair: str, dtype_name: str, args) -> list[dict]:
    """Every (NC, tile) case of one (pair, dtype), in this process."""
    K, V = (int(v) for v in pair.split("x"))
    dtype = getattr(torch, dtype_name)
    rows = []
    for tile in [None, *args.tile]:
        launches = launches_for(
            K, V, tile, args.heads, args.device, dtype == torch.float32, scan_precision(dtype, args.tf32)
        )
        if launches is None:
            continue
        for NC in args.chunks:
            rtol = RTOL_TF32 if args.tf32 and dtype_name == "float32" else RTOL[dtype_name]
            row = dict(K=K, V=V, NC=NC, dtype=dtype_name, tile=tile, launches=launches, rtol=rtol, tf32=args.tf32)
            try:
                row.update(check_case(K, V, NC, dtype, launches, args.heads, args.device, args.tf32))
                row["ok"] = row["rebuilt_same_bits"] and max(row["errors"].values()) <= row["rtol"]
            except Exception as e:  # a faulting launch: recorded, and the process ends (its context is lost)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                rows.append(row)
                return rows
            rows.append(row)
    return rows


def spawn(pair: str, dtype_name: str, argv: list[str]) -> list[dict]:
    """`run_group` in a child process; its rows, or one row saying how it ended without them."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, __file__, *argv, "--group", pair, dtype_name]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("ROW: ")]
    if p.returncode and not any("error" in r for r in rows):
        K, V = (int(v) for v in pair.split("x"))
        rows.append(dict(K=K, V=V, dtype=dtype_name, ok=False, error=f"exit {p.returncode}: {p.stderr[-600:]}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), help="head dims KxV")
    p.add_argument("--chunks", nargs="+", type=int, default=[1, 2, 3], help="chunk counts NC")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"], choices=sorted(RTOL))
    p.add_argument("--tile", action="append", type=json.loads, default=[], help="launch keys (JSON) to try too")
    p.add_argument("--heads", type=int, default=4, help="(batch, head) pairs, one scan each")
    p.add_argument("--tf32", action="store_true", help="the scans' products in tf32 (float32 inputs under TF32)")
    p.add_argument("--jobs", type=int, default=4, help="groups run at once")
    p.add_argument("--out", default=None, help="JSON to write")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--group", nargs=2, metavar=("PAIR", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for pair in args.pairs:
        try:
            K, V = (int(v) for v in pair.split("x"))
        except ValueError:
            p.error(f"--pairs takes KxV, e.g. 128x128; got {pair!r}")
        if not (K > 0 and V > 0):
            p.error(f"--pairs: head dims must be positive; got {pair!r}")
    if any(n < 1 for n in args.chunks):
        p.error(f"--chunks must be at least 1; got {args.chunks}")
    if args.device == "cpu" and "bfloat16" in args.dtypes and not args.group:  # a group: its parent checked
        p.error("bfloat16 needs a GPU: Triton's interpreter computes it wrongly")
    if args.group:
        for row in run_group(*args.group, args):
            print("ROW: " + json.dumps(row), flush=True)
        return
    child_argv = ["--chunks", *map(str, args.chunks), "--heads", str(args.heads)] + ["--tf32"] * args.tf32
    for tile in args.tile:
        child_argv += ["--tile", json.dumps(tile)]
    groups = [(pair, d) for pair in args.pairs for d in args.dtypes]
    rows = []
    with ThreadPoolExecutor(args.jobs) as ex, tqdm(total=len(groups), desc="scan checks") as bar:
        for part in ex.map(lambda g: spawn(*g, child_argv), groups):
            rows += part
            bar.update()
    failures = sum(not r["ok"] for r in rows)
    for r in rows:
        if "errors" in r:
            name, err = max(r["errors"].items(), key=lambda kv: kv[1])
            worst = f"worst {name} {err:.2e}" + ("" if r["rebuilt_same_bits"] else ", rebuilt states differ")
        else:
            worst = r["error"]
        print(f"K={r['K']:3d} V={r['V']:3d} NC={r.get('NC', '-')} {r['dtype']:9s} tile={r.get('tile')} "
              f"{worst} {'ok' if r['ok'] else 'FAIL'}")  # fmt: skip
    print(f"{len(rows) - failures}/{len(rows)} cases within tolerance")
    if args.out:
        from osdn_hf.ops.osdn import tuning
        from osdn_hf.run_info import run_metadata

        result = dict(
            run_metadata(args.commit),
            launch=tuning.launch_settings(),
            reference="chunk_scan.state_scan_torch and its autograd gradients, float32, on the same rounded inputs",
            error="max |a - b| / max |b| per output",
            failures=failures,
            rows=rows,
        )
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
