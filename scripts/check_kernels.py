"""Check the CUDA kernels against `naive_recurrent_osdn`: outputs, final states, all gradients.

    python scripts/check_kernels.py --out benchmarks/results/kernels_check.json --commit SHA

Runs `chunk_osdn` and `fused_recurrent_osdn` on CUDA tensors (the Triton path) at
T in {1, 63, 64, 100, 1000, 4096}, with initial states (and at three sizes without: the default
ones, the final states unused) and with packed `cu_seqlens`, at 1 to 128 (batch, head) pairs,
in float32, float16 and bfloat16, and compares each with the float32 token loop on the same
inputs; `fused_recurrent_osdn` also in place (`inplace_final_state`,
as cached decoding runs it), which must give the same bits. Writes one JSON row per case and
exits non-zero if any case is out of tolerance.
`--shard I/N` runs every N-th case from the I-th (0-based), so N processes side by side share
a run whose compiling would not fit one call (float32 compiles its ieee products for about a
minute per shape); `--merge A.json B.json ... --out ALL.json` joins their rows into one file
(each row keeps the shard it came from; shards that never wrote a file are named as missing).
`--tf32` runs the kernels with torch's float32 matmuls in TF32, so float32 inputs multiply in tf32
(`osdn_hf.ops.osdn.utils.dot_precision`), checked at float16's tolerance; the reference runs
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from tqdm import tqdm

from osdn_hf.ops import chunk_osdn, fused_recurrent_osdn, naive_recurrent_osdn
from osdn_hf.ops.osdn import tuning
from osdn_hf.run_info import command_line, run_metadata

# Relative (norm-wise) error allowed against the float32 loop on the same inputs. float32
# runs exact products ("ieee"), so only summation order differs; 16-bit runs use tf32 products
# inside, store the chunked intermediates in the input dtype (as fla does) and return outputs
# and gradients rounded to it (2^-11, 2^-8). float16 allows 1e-2: since 6ca9804 stores in 16
# bits, dlam at T = 63 (one partial chunk, a small gradient) reaches 6.4e-3 (4.5e-3 before),
# every other float16 case stays under 2.2e-3 (benchmarks/results/kernels_check_float16.json).
# Since 0bc0098 the backward's gradient pieces pass between kernels in 16 bits too
# (tuning.GRAD_STORAGE): the worst case, dlam in one chunk (T = 63, 64), went 1.39e-2 ->
# 1.66e-2 in bf16 and 3.9e-3 -> 4.8e-3 in float16 (kernels_check_16bit_{60434f8,0bc0098}.json).
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# With --tf32, float32 inputs run tf32 products (torch's float32 matmuls in TF32: 2^-11 per
# product, as float16's rounding), their intermediates kept in float32: float16's tolerance.
RTOL_TF32 = 1e-2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRADS = ("q", "k", "v", "beta", "eta", "lam", "initial_state", "initial_precond")


def make_inputs(B, T, H, K, V, N, dtype, device, seed, states=True):
    """The op's tensors; with `states` False no initial states (the default ones, as a model's
    training step starts)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, device=device)  # noqa: E731
    x = dict(
        q=r(B, T, H, K).to(dtype),
        k=r(B, T, H, K).to(dtype),
        v=r(B, T, H, V).to(dtype),
        beta=u(B, T, H),
        eta=u(B, T, H),
        lam=0.1 + 0.9 * u(B, T, H),
        initial_state=0.5 * r(N, H, K, V),
        initial_precond=0.5 + u(N, H, K),
    )
    if not states:
        del x["initial_state"], x["initial_precond"]
    return {n: t.requires_grad_() for n, t in x.items()}


def run(fn, inputs, cot, cu_seqlens):
    """Outputs and gradients of one call. With initial states the loss reads the final states too;
    without (`make_inputs(states=False)`), the output alone, no final state returned: the op's
    default path, whose kernels then make neither the default states nor their gradients."""
    for t in inputs.values():
        t.grad = None
    states = "initial_state" in inputs
    o, S, d = fn(**inputs, output_final_state=states, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
    loss = (o.float() * cot[0]).sum()
    if states:
        loss = loss + (S * cot[1]).sum() + (d * cot[2]).sum()
    loss.backward()
    grads = {n: inputs[n].grad.detach().clone() for n in GRADS if n in inputs}
    finals = {"final_state": S.detach(), "final_precond": d.detach()} if states else {}
    return {"o": o.detach(), **finals, **{f"d{n}": g for n, g in grads.items()}}


def inplace_same_bits(inputs, got, cu_seqlens) -> bool:
    """`fused_recurrent_osdn` with `inplace_final_state` (the model's cached decoding) on copies
    of the initial states gives the out-of-place call's bits, in those same tensors."""
    plain = {n: x.detach() for n, x in inputs.items()}
    S0, d0 = plain["initial_state"].clone(), plain["initial_precond"].clone()
    with torch.no_grad():
        o, S, d = fused_recurrent_osdn(
            **{**plain, "initial_state": S0, "initial_precond": d0},
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            inplace_final_state=True,
        )
    same = (torch.equal(o, got["o"]), torch.equal(S, got["final_state"]), torch.equal(d, got["final_precond"]))
    return S is S0 and d is d0 and all(same)


@contextlib.contextmanager
def float32_matmul(tf32: bool):
    """Float32 matmuls in TF32 inside (`osdn_hf.ops.osdn.utils.float32_tf32` then holds), as
    before after; with `tf32` False, nothing changes."""
    if not tf32:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def merge(paths, out, argv):
    """Join shard files into one result: rows in shard order, failures summed, the commands kept;
    shards that wrote no file (`missing_shards`) or fewer rows than they planned, cut short by a
    time limit (`unfinished_shards`), are named."""
    rows, commands, missing, unfinished = [], [], [], []
    result = None
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            missing.append(f"{path}: {type(err).__name__}")
            continue
        result = result or {k: v for k, v in part.items() if k not in ("rows", "failures", "command", "planned")}
        commands.append(part.get("command"))
        if len(part["rows"]) < part.get("planned", 0):
            unfinished.append(f"{path}: {len(part['rows'])} of {part['planned']} cases")
        rows += [dict(r, shard=part.get("command")) for r in part["rows"]]
    if result is None:
        print(f"no shard file could be read: {missing}")
        return 1
    failures = sum(not r["ok"] for r in rows)
    result.update(command=command_line("scripts/check_kernels.py", argv), shards=commands)
    result.update(missing_shards=missing, unfinished_shards=unfinished, rows=rows, failures=failures)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{len(rows) - failures}/{len(rows)} cases within tolerance in {len(commands)} shards; "
        f"missing: {missing}; unfinished: {unfinished}"
    )
    return 1 if failures or missing or unfinished else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/kernels_check.json")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="a share of the run")
    p.add_argument("--max-head-dim", type=int, default=256, help="skip cases with K or V above this (a share)")
    p.add_argument("--min-tokens", type=int, default=0, help="only cases of at least this many tokens (a share)")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th case from the I-th (a share)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="join the shards' files into --out, run nothing")
    p.add_argument(
        "--prefetch", choices=("all", "none"), help="all four scans load a chunk ahead, or none (default: as tuned)"
    )
    p.add_argument(
        "--one-kernel-scan",
        action="store_true",
        help="phase 1's backward scan adding its rows' gradients itself at every size (the default splits them off)",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="float32 matmuls in TF32 around the kernels' calls (their products then tf32), not the reference's",
    )
    p.add_argument(
        "--inverse",
        choices=("substitution", "doubling"),
        help="how the 64 x 64 inverses' diagonal blocks are inverted (default: tuning.INVERSE)",
    )
    args = p.parse_args(argv)
    if args.merge:
        sys.exit(merge(args.merge, args.out, argv))
    if args.prefetch:
        for entry in tuning.SCAN_TUNING.values():
            entry["prefetch"] = args.prefetch == "all"
    if args.one_kernel_scan:
        tuning.SCAN_TUNING["precond_bwd"]["split_below"] = 0
    if args.inverse:
        tuning.INVERSE["doubling"] = args.inverse == "doubling"
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    if not torch.cuda.is_available():
        sys.exit("check_kernels.py needs a CUDA GPU (on CPU, tests/test_triton.py runs the kernels interpreted)")
    device = "cuda"
    KV = 64
    cases = []
    for T in (1, 63, 64, 100, 1000, 4096):
        cases.append(dict(B=2, T=T, K=KV, V=KV, varlen=None))
    cases.append(dict(B=1, T=None, K=KV, V=KV, varlen=[1, 63, 64, 100, 1000, 0, 37]))
    for K, V in ((32, 32), (128, 128), (256, 256), (100, 48)):
        cases.append(dict(B=2, T=100, K=K, V=V, varlen=None))
    for K, V in ((128, 128), (256, 256), (32, 32), (100, 48)):  # one chunk (NC = 1; kernels_scan_nc1.json)
        cases.append(dict(B=2, T=64, K=K, V=V, varlen=None))
    # more (batch, head) pairs: the state scans' other launches (chunk_fused._scan_launch fits them
    # to the SMs: at K = V = 128 on an H100 or H200, 16-bit, 32 pairs run BV 32, 64 BV 64 at one
    # program an SM, 128 two an SM, and 256 in waves of two; float32 storage its own),
    # one head alone (H = 1, which Triton specializes as a constant), and 32 pairs, where phase 1's
    # forward scans share SMs with two workers each (chunk_fused._overlap_workers; up to 16 pairs
    # they run beside one worker an SM, as in the cases above)
    # From 64 pairs up phase 1 runs in chunks of 32 (tuning.PHASE1): those cases, and a long
    # one and packed sequences there too
    for B, heads, T in ((1, 1, 100), (4, 16, 200), (8, 16, 100), (2, 16, 300), (4, 16, 1000), (16, 16, 100)):
        cases.append(dict(B=B, H=heads, T=T, K=128, V=128, varlen=None))
    cases.append(dict(B=1, H=16, T=None, K=128, V=128, varlen=[1, 63, 64, 100, 1000, 0, 37]))
    # phase 1 in chunks of 32 at other head dims, where it launches with its own warps and tiles
    # (tuning.PHASE1["launch"])
    for K, V in ((64, 64), (256, 256), (100, 48)):
        cases.append(dict(B=4, H=16, T=200, K=K, V=V, varlen=None))
    # no initial states, and the final ones unused (a training step): the scans start from the
    # default states without their being made in memory; phase 1 in chunks of 64 beside its
    # workers, in chunks of 32, and packed sequences
    cases.append(dict(B=2, T=1000, K=KV, V=KV, varlen=None, states=False))
    cases.append(dict(B=4, H=16, T=1000, K=128, V=128, varlen=None, states=False))
    cases.append(dict(B=1, H=16, T=None, K=128, V=128, varlen=[1, 63, 64, 100, 1000, 0, 37], states=False))
    # few pairs and long sequences with a backward to follow: phase 1 in chunks of 32, its scans in
    # groups with their maps (chunk_fused._precond_groups; 8 groups of 16 chunks at T = 4096), with
    # and without initial states, and packed sequences padded to 4096 (3 x 8 pairs)
    cases.append(dict(B=1, H=16, T=4096, K=128, V=128, varlen=None))
    cases.append(dict(B=1, H=16, T=4096, K=128, V=128, varlen=None, states=False))
    cases.append(dict(B=1, H=8, T=None, K=128, V=128, varlen=[4096, 100, 2100]))

    cases = [c for c in cases if max(c["K"], c["V"]) <= args.max_head_dim]
    cases = [c for c in cases if (c["T"] or sum(c["varlen"])) >= args.min_tokens][shard::shards]
    rows, failures = [], 0
    result = dict(
        **run_metadata(args.commit, "scripts/check_kernels.py", argv),
        launch=tuning.launch_settings(),
        reference="naive_recurrent_osdn (float32 token loop) on the same inputs",
        rows=rows,
    )
    work = [(c, name, op) for c in cases for name in args.dtypes for op in ("chunk", "fused_recurrent")]
    result["planned"] = len(work)  # rows this shard means to write (--merge names a shard cut short)
    refs = {}  # the float32 loop once per case and dtype, shared by both ops
    for case, dname, op in tqdm(work, desc="kernel checks"):
        dtype = DTYPES[dname]
        rtol = RTOL_TF32 if args.tf32 and dtype == torch.float32 else RTOL[dtype]
        cu = None
        T, B, H = case["T"], case["B"], case.get("H", 2)
        if case["varlen"] is not None:
            cu = torch.tensor([0, *torch.tensor(case["varlen"]).cumsum(0).tolist()], device=device)
            T = int(cu[-1])
        N = B if cu is None else len(cu) - 1
        states = case.get("states", True)
        inputs = make_inputs(B, T, H, case["K"], case["V"], N, dtype, device, seed=T, states=states)
        g = torch.Generator(device=device).manual_seed(1)
        cot = (
            torch.randn(B, T, H, case["V"], generator=g, device=device),
            torch.randn(N, H, case["K"], case["V"], generator=g, device=device),
            torch.randn(N, H, case["K"], generator=g, device=device),
        )
        fn = chunk_osdn if op == "chunk" else fused_recurrent_osdn
        row = dict(
            op=op,
            dtype=dname,
            B=B,
            T=T,
            H=H,
            K=case["K"],
            V=case["V"],
            cu_seqlens=case["varlen"],
            initial_state=states,
            rtol=rtol,
        )
        try:
            with float32_matmul(args.tf32):
                got = run(fn, inputs, cot, cu)
            key = (id(case), dname)
            if key not in refs:
                refs = {key: run(naive_recurrent_osdn, inputs, cot, cu)}
            ref = refs[key]
            row["rel_err"] = {n: rel_err(got[n], ref[n]) for n in ref}
            row["ok"] = all(e <= rtol for e in row["rel_err"].values())
            if op == "fused_recurrent" and states:
                row["inplace_same_bits"] = inplace_same_bits(inputs, got, cu)
                row["ok"] = row["ok"] and row["inplace_same_bits"]
        except Exception as err:  # a kernel that fails to compile or run is a failed case, not the end
            row["rel_err"], row["ok"], row["error"] = {}, False, f"{type(err).__name__}: {err}"[:300]
        failures += not row["ok"]
        rows.append(row)
        result["failures"] = failures
        with open(args.out, "w") as f:  # after every case: a run cut short by a time limit keeps its log
            json.dump(result, f, indent=1)

    for r in rows:
        if "error" in r:
            print(f"{r['op']:16s} {r['dtype']:9s} T={r['T']:5d} K={r['K']:3d} ERROR {r['error']}")
            continue
        worst = max(r["rel_err"], key=r["rel_err"].get)
        print(
            f"{r['op']:16s} {r['dtype']:9s} T={r['T']:5d} K={r['K']:3d} V={r['V']:3d} "
            f"varlen={'y' if r['cu_seqlens'] else 'n'} "
            f"worst {worst}={r['rel_err'][worst]:.1e} {'ok' if r['ok'] else 'FAIL'}"
        )
    print(f"{len(rows) - failures}/{len(rows)} cases within tolerance")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
