"""Time and check the kernels' unit lower-triangular inverse, by either way of inverting the
diagonal 16 x 16 blocks (forward substitution, or the doubling product).

    python scripts/bench_inverse.py --out benchmarks/results/inverse.json --commit SHA

`chunk_kernels._invert` (64 x 64, in 16 x 16 blocks) runs alone in `inverse_kernel`, one chunk
per program, on `--chunks` matrices shaped like phase 2's `A = tril(diag(b) K W^T, -1)` (unit-norm
keys, b in (0, 1)): random keys, keys correlated within a chunk, and one key repeated
(`make_a`). Each method's error is taken against the float64 inverse, norm-wise per chunk (the
worst chunk); its time is `do_bench`'s median and the GPU time of one launch. On CPU (Triton's
interpreter) it only checks, on a few chunks. On a GPU it also records both kernels that invert,
and the op's whole forward+backward, by each method (`in_op`, GPU time at 4 x 4096 x 16 heads).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

C, K = 64, 128
METHODS = {"substitution": False, "doubling": True}
KEYS = ("random", "correlated", "repeated")


def make_a(n: int, keys: str, device: str, seed: int = 0) -> torch.Tensor:
    """`n` matrices `tril(diag(b) K W^T, -1)` [n, C, C] float32, K and W unit-norm rows. `keys`:
    "random"; "correlated" (rows share a direction, <k_i, k_j> near 0.8); "repeated" (one key
    repeated with 10% noise and b near 1, as a run of one token gives: entries near 1, where the
    doubling product's powers of A grow to thousands before they cancel)."""
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(n, C, K, generator=g, device=device)
    if keys != "random":
        k = {"correlated": 2, "repeated": 10}[keys] * torch.randn(n, 1, K, generator=g, device=device) + k
    k = torch.nn.functional.normalize(k, dim=-1)
    w = torch.nn.functional.normalize(k * (0.5 + torch.rand(n, C, K, generator=g, device=device)), dim=-1)
    b = torch.rand(n, C, 1, generator=g, device=device)
    if keys == "repeated":
        b = 0.95 + 0.05 * b
    return (b * k @ w.transpose(-1, -2)).tril(-1).contiguous()


def invert(a: torch.Tensor, doubling: bool) -> torch.Tensor:
    from osdn_hf.ops.osdn.chunk_kernels import inverse_kernel

    t = torch.empty_like(a)
    inverse_kernel[(a.shape[0],)](a, t, C=C, DOUBLING=doubling, num_warps=4)
    return t


def worst_error(t: torch.Tensor, a: torch.Tensor) -> float:
    """Largest per-chunk ||T - (I + A)^{-1}|| / ||(I + A)^{-1}|| against float64."""
    eye = torch.eye(C, dtype=torch.float64, device=a.device)
    ref = torch.linalg.solve_triangular(eye + a.double(), eye.expand_as(a.double()), upper=False)
    err = (t.double() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    return err.max().item()


def in_op(B: int = 4, T: int = 4096, H: int = 16) -> dict:
    """GPU time (us) of the two kernels that invert (`wy_fwd_kernel`, `pre_intra_fwd_kernel`) and
    of one whole forward+backward of `chunk_osdn` (bf16, K = V = 128), by each method: the step
    and per-kernel profile of `profile_kernels.py` (beside this script)."""
    from profile_kernels import _step, kernel_times

    from osdn_hf.ops.osdn import tuning

    step = _step(B, T, H, K)
    out, before = dict(B=B, T=T, H=H, K=K, V=K), dict(tuning.INVERSE)
    for name, doubling in METHODS.items():
        tuning.INVERSE["doubling"] = doubling
        times = kernel_times(step)  # after three untimed calls (the first compiles)
        out[name] = dict(
            wy_fwd_us=times.get("wy_fwd_kernel"),
            pre_intra_fwd_us=times.get("pre_intra_fwd_kernel"),
            fwdbwd_us=sum(times.values()),
        )
    tuning.INVERSE.update(before)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/inverse.json")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--chunks", type=int, default=4096, help="matrices per launch (4 x 4096 x 16 heads: 4096)")
    args = p.parse_args(argv)
    if args.chunks < 1:
        p.error(f"--chunks must be at least 1, got {args.chunks}")
    from osdn_hf.run_info import run_metadata

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench_inverse.py needs a CUDA GPU, or TRITON_INTERPRET=1 to check on CPU")
    device = "cuda" if cuda else "cpu"
    n = args.chunks if cuda else min(args.chunks, 4)
    if cuda:
        from triton.testing import do_bench

        from osdn_hf.throughput import gpu_time_us
    rows = []
    for keys in KEYS:
        a = make_a(n, keys, device)
        row = dict(keys=keys, chunks=n)
        for name, doubling in METHODS.items():
            t = invert(a, doubling)
            if not doubling:
                row["inverse_max_abs"] = t.abs().max().item()
            row[f"{name}_rel_err"] = worst_error(t, a)
            if cuda:
                call = functools.partial(invert, a, doubling)
                row[f"{name}_us"] = 1e3 * do_bench(call, warmup=25, rep=100)
                row[f"{name}_gpu_us"] = gpu_time_us(call)
        rows.append(row)
        print(json.dumps(row))
    result = dict(**run_metadata(args.commit, "scripts/bench_inverse.py", argv), rows=rows)
    if cuda:
        result["in_op"] = in_op()
        print(json.dumps(result["in_op"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
