"""How long each of `chunk_osdn`'s Triton kernels takes to compile for a GPU, measured without one.

    python scripts/compile_times.py --dtype float32 --head-dim 128 --out compile.json
    python scripts/compile_times.py --dtype float32 --head-dim 128 --precision tf32x3 --only out_bwd_kernel

A child process runs one forward+backward of `chunk_osdn` through Triton's interpreter and
records every kernel launch (its argument types, constexprs and launch options), so the
launches are exactly the ones the op makes for that dtype and head dim. Each distinct launch is
then compiled for `--arch` (default sm_90, Hopper) with Triton's own compiler and `ptxas`, which
ship with the `triton` wheel, into an empty cache, and timed. `--precision` overrides the kernels' `PRECISION`
(float32 runs "ieee" products, 16-bit inputs "tf32") to see what another choice would cost, and
`--num-warps` the launches' warps.
Writes one JSON row per launch (seconds, shared memory, and from `cuobjdump -res-usage` the
registers and stack bytes a thread: stack is where registers spill) and prints them as they finish. The
compile is the launch's, with the specialisation Triton adds at run time for pointers to 16-byte
aligned data (`tt.divisibility`, as recorded for each tensor in the child), which can change the
code a great deal: without it, `precond_scan_bwd_de_kernel` at 7a8f347 (bf16, head dim 128)
compiled to 32 registers and 3768 bytes of stack, with it to 254 and none. The integer
specialisations (integers that equal 1 or divide by 16) are not made.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

from osdn_hf.run_info import run_metadata

DTYPES = ("float32", "float16", "bfloat16")


def capture(dtype_name: str, head_dim: int, out: str) -> None:
    """In a child with TRITON_INTERPRET=1: run the op once and write every distinct launch to `out`."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from osdn_hf.ops import chunk_osdn

    pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}
    pointer[torch.int64] = "*i64"
    launches, run = [], InterpretedFunction.run

    def record(self, *args, grid, warmup=False, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args), **kwargs)
        launch = dict(name=self.fn.__name__, module=self.fn.__module__, signature={}, constexprs={}, options={})
        for name, param in params.items():
            value = bound.get(name, param.default)
            if "constexpr" in str(param.annotation) or value is None or isinstance(value, (bool, str)):
                launch["signature"][name] = "constexpr"
                launch["constexprs"][name] = value
            elif isinstance(value, torch.Tensor):
                launch["signature"][name] = pointer[value.dtype]
                if value.data_ptr() % 16 == 0:  # what Triton's runtime specializes a pointer on
                    launch.setdefault("aligned", []).append(name)
            else:
                launch["signature"][name] = "fp32" if isinstance(value, float) else "i32"
        launch["options"] = {k: bound[k] for k in ("num_warps", "num_stages") if k in bound}
        if launch not in launches:
            launches.append(launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = record
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 100, 1, head_dim
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    beta, eta, lam = (torch.rand(B, T, H, generator=g).requires_grad_() for _ in range(3))
    o, s, d = chunk_osdn(q, k, v, beta, eta, lam, output_final_state=True, use_qk_l2norm_in_kernel=True)
    (o.float().sum() + s.sum() + d.sum()).backward()
    with open(out, "w") as f:
        json.dump(launches, f)


def compile_launch(launch: dict, arch: int, precision: str | None, num_warps: int | None = None) -> dict:
    """Compile one recorded launch for `arch` and time it; `precision` and `num_warps` override
    the launch's own."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    constexprs = dict(launch["constexprs"])
    if precision and "PRECISION" in constexprs:
        constexprs["PRECISION"] = precision
    aligned = set(launch.get("aligned", []))  # arguments are numbered as the signature lists them
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(launch["signature"]) if name in aligned}
    source = ASTSource(fn=fn, signature=launch["signature"], constexprs=constexprs, attrs=attrs)
    options = dict(
        num_warps=num_warps or launch["options"].get("num_warps", 4), num_stages=launch["options"].get("num_stages", 3)
    )
    start = time.perf_counter()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 64 if arch < 100 else 32), options=options)
    seconds = time.perf_counter() - start
    return dict(
        kernel=launch["name"],
        constexprs=constexprs,
        aligned=sorted(aligned),
        options=options,
        seconds=seconds,
        shared_bytes=kernel.metadata.shared,
        **resource_usage(kernel.asm["cubin"]),
    )


def resource_usage(cubin: bytes) -> dict:
    """Registers a thread and stack bytes a thread (where registers spill) of a compiled kernel,
    from `cuobjdump -res-usage` (shipped with the triton wheel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report))
    if "REG" not in found:
        raise ValueError(f"no register count in cuobjdump's report: {report!r}")
    return dict(
        registers=int(found["REG"]), stack_bytes=int(found.get("STACK", 0)), local_bytes=int(found.get("LOCAL", 0))
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: Hopper)")
    p.add_argument("--precision", help="override the kernels' PRECISION constexpr (ieee, tf32, tf32x3)")
    p.add_argument(
        "--num-warps", type=int, help="override every launch's num_warps (registers a thread fall with more)"
    )
    p.add_argument("--only", nargs="+", help="only these kernels (by function name)")
    p.add_argument("--out", help="write the rows here (JSON)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--capture", metavar="JSON", help=argparse.SUPPRESS)  # the child's part
    args = p.parse_args(argv)
    if args.capture:
        capture(args.dtype, args.head_dim, args.capture)
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # an empty cache: every kernel compiles
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", OSDN_FORCE_TRITON="1")
        child = [sys.executable, __file__, "--dtype", args.dtype, "--head-dim", str(args.head_dim), "--capture", path]
        subprocess.run(child, env=env, check=True)
        with open(path) as f:
            launches = json.load(f)
        if args.only:
            launches = [launch for launch in launches if launch["name"] in args.only]
        rows = []
        for launch in tqdm(launches, desc="compiling"):
            rows.append(compile_launch(launch, args.arch, args.precision, args.num_warps))
            r = rows[-1]
            tqdm.write(
                f"{r['kernel']:28s} {r['seconds']:7.1f} s  shared {r['shared_bytes']} B  "
                f"{r['registers']} registers, stack {r['stack_bytes']} B"
            )
    result = dict(
        **run_metadata(args.commit, "scripts/compile_times.py", argv),
        target=f"sm_{args.arch}",
        dtype=args.dtype,
        head_dim=args.head_dim,
        precision=args.precision,
        num_warps=args.num_warps,
        total_seconds=sum(r["seconds"] for r in rows),
        rows=rows,
    )
    print(f"{len(rows)} launches, {result['total_seconds']:.0f} s in all")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
