"""Peak memory of one forward+backward of `chunk_osdn`'s Triton path, counted on the CPU.

    TRITON_INTERPRET=1 python scripts/op_memory.py --out benchmarks/results/op_memory_cpu.json

Runs the CUDA kernels through Triton's interpreter (`OSDN_FORCE_TRITON=1`) at two small
lengths and counts the bytes of every tensor the op makes (`osdn_hf.memory.LiveBytes`), at its
peak and between forward and backward (what a model holds per layer until its backward). Every
buffer of the op grows with B*H*T (chunked tensors) or B*H (states), so the two lengths give
both parts and the figure at the benchmark's shape (4 x 4096, H=16, K=V=128, bf16) follows. The
JSON also gives the same extrapolation in the unit `X`, one `[B, T, H, 128]` 16-bit tensor
(64 MiB at that shape). No GPU is needed, so a change of the op's memory can be checked before
`scripts/bench_kernels.py` measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 before running (the kernels run through Triton's interpreter)")
os.environ["OSDN_FORCE_TRITON"] = "1"

import torch  # noqa: E402

from osdn_hf.memory import LiveBytes  # noqa: E402
from osdn_hf.ops import chunk_osdn  # noqa: E402
from osdn_hf.run_info import run_metadata  # noqa: E402

BENCH = dict(B=4, T=4096, H=16)
K = V = 128


def measure(B: int, T: int, H: int, dtype=torch.float16) -> dict:
    """Bytes the op makes: live after the forward (saved for the backward, and o) and at the peak."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype).requires_grad_() for D in (K, K, V))
    beta, eta = (torch.rand(B, T, H, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    lam = (0.9 + 0.1 * torch.rand(B, T, H, generator=g)).to(dtype).requires_grad_()
    do = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    with LiveBytes() as mem:
        o = chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0]
        after_forward = mem.now
        o.backward(do)
        del o
    return dict(B=B, T=T, H=H, after_forward=after_forward, peak=mem.peak, grads=mem.now)


def extrapolate(a: dict, b: dict, key: str, B: int, T: int, H: int) -> float:
    """`key` at (B, T, H) from two runs at the same B, H: bytes = B H (per_token T + per_sequence)."""
    bh = a["B"] * a["H"]
    per_token = (b[key] - a[key]) / (bh * (b["T"] - a["T"]))
    per_sequence = a[key] / bh - per_token * a["T"]
    return B * H * (per_token * T + per_sequence)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/op_memory_cpu.json")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--lengths", type=int, nargs=2, default=(128, 256), help="two T, multiples of 64")
    args = p.parse_args(argv)
    if any(t % 64 or t <= 0 for t in args.lengths) or args.lengths[0] == args.lengths[1]:
        p.error(f"--lengths must be two different positive multiples of 64, got {args.lengths}")
    runs = [measure(1, t, 2) for t in args.lengths]
    x = BENCH["B"] * BENCH["T"] * BENCH["H"] * 128 * 2  # one [B, T, H, 128] 16-bit tensor
    at_bench = {key: extrapolate(*runs, key, **BENCH) for key in ("after_forward", "peak", "grads")}
    result = dict(
        **run_metadata(args.commit, "scripts/op_memory.py", argv),
        what=(
            "bytes of the tensors chunk_osdn's Triton path makes in one forward+backward (interpreted on the CPU, "
            "float16: the same sizes as bfloat16), counted by osdn_hf.memory.LiveBytes; inputs not counted"
        ),
        shape=dict(**BENCH, K=K, V=V),
        runs=runs,
        at_bench_mib={key: val / 2**20 for key, val in at_bench.items()},
        at_bench_x={key: val / x for key, val in at_bench.items()},
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for key in ("after_forward", "peak", "grads"):
        print(f"{key:14s} {at_bench[key] / 2**20:8.0f} MiB  {at_bench[key] / x:5.2f} X  at {BENCH}, K=V=128")


if __name__ == "__main__":
    main()
