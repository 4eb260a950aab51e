"""How the op's kernels are launched and checked: the launch tables and the rules that read them,
the launcher that skips Triton's per-call binding, and the GPU-side scripts (check_scans,
bench_inverse, compile_times, profile_kernels) run on CPU through Triton's interpreter."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import interpreted_triton, make_inputs

interpreted_triton()

from osdn_hf.ops import chunk_osdn  # noqa: E402
from osdn_hf.ops.osdn import (  # noqa: E402
    chunk_fused,
    tuning,
)
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV  # noqa: E402


def test_check_scans_script_checks_launches_on_cpu(tmp_path):
    """scripts/check_scans.py under the interpreter: the package's launch and a given tile, at one
    and two chunks, in float32 and float16, every case within tolerance with the rebuilt states
    the same bits; a tile that cannot run on the pair (prefetching part of a chunk) is skipped."""
    out = tmp_path / "scans.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script's children set it
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    tile, unfit = {"BV": 16, "BS": 32, "PREFETCH": False}, {"BS": 32, "PREFETCH": True}
    script = Path(__file__).parents[1] / "scripts" / "check_scans.py"
    cmd = [sys.executable, str(script), "--pairs", "32x32", "--chunks", "1", "2", "--dtypes", "float32", "float16"]
    cmd += ["--tile", json.dumps(tile), "--tile", json.dumps(unfit), "--jobs", "2", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["failures"] == 0 and len(rows) == 8, rows  # 2 dtypes x (package, tile) x 2 chunk counts
    assert all(r["ok"] and r["rebuilt_same_bits"] for r in rows), rows
    assert [r["tile"] for r in rows if r["dtype"] == "float16"] == [None, None, tile, tile]
    assert {r["launches"]["state_fwd"]["BV"] for r in rows if r["tile"]} == {16}
    assert result["device"] and result["commit"] == "unknown" and "state_fwd" in result["launch"]["scans"]


def test_check_scans_under_tf32_checks_the_launches_the_op_takes(monkeypatch):
    """`check_scans.py --tf32` checks the state scans at the launches float32 inputs under TF32
    take (`TF32_LAUNCH`), not exact float32's: until 3003624 it passed no precision and checked
    IEEE_LAUNCH's BV 16 at 8 warps, which the op does not run in tf32 (its failures on an H200 were
    that launch's: benchmarks/results/scans_check_tf32_h16_3003624.json). As on a GPU of 132 SMs,
    one group in this process, under the interpreter."""
    import argparse

    import check_scans  # scripts/, on the path through conftest.py

    monkeypatch.setattr(chunk_fused, "_sm_count", lambda device: 132)
    args = argparse.Namespace(tile=[], heads=2, device="cpu", chunks=[2], tf32=True)
    rows = check_scans.run_group("32x32", "float32", args)
    tf32 = {n: chunk_fused._scan_launch(n, 32, 32, 64, 2, "cpu", True, "tf32") for n in ("state_fwd", "state_bwd")}
    ieee = {n: chunk_fused._scan_launch(n, 32, 32, 64, 2, "cpu", True, "ieee") for n in ("state_fwd", "state_bwd")}
    assert tf32 != ieee and (ieee["state_bwd"]["BV"], ieee["state_bwd"]["num_warps"]) == (16, 8), ieee
    assert [r["launches"] for r in rows] == [tf32] and rows[0]["ok"], rows


def test_check_scans_finds_a_wrong_gradient(monkeypatch):
    """The scan check can fail: a reverse scan 2% off in dUb is caught, beyond float16's tolerance."""
    import check_scans  # scripts/, on the path through conftest.py

    launches = check_scans.launches_for(32, 32, None, heads=2, device="cpu")
    good = check_scans.check_case(32, 32, 2, torch.float16, launches, heads=2, device="cpu")
    assert max(good["errors"].values()) <= check_scans.RTOL["float16"] and good["rebuilt_same_bits"], good
    scan_bwd = chunk_fused._state_scan_bwd
    monkeypatch.setattr(chunk_fused, "_state_scan_bwd", lambda *a: (lambda d: (d[0] * 1.02, *d[1:]))(scan_bwd(*a)))
    bad = check_scans.check_case(32, 32, 2, torch.float16, launches, heads=2, device="cpu")
    assert bad["errors"]["dUb"] > check_scans.RTOL["float16"], bad


def test_bench_inverse_script_checks_on_cpu(tmp_path):
    """scripts/bench_inverse.py under the interpreter: both methods' errors, no timings."""
    out = tmp_path / "inverse.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    script = Path(__file__).parents[1] / "scripts" / "bench_inverse.py"
    subprocess.run([sys.executable, str(script), "--chunks", "2", "--out", str(out)], env=env, check=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["keys"] for r in rows] == ["random", "correlated", "repeated"]
    assert all(r["substitution_rel_err"] < 2e-6 and r["doubling_rel_err"] < 2e-4 for r in rows), rows
    assert not any("_us" in key for r in rows for key in r), rows  # no timings off a GPU


def test_phase_two_gradient_of_k_is_added_inside_phase_one(monkeypatch):
    """Both phases read the chunked k. Phase 1 passes k on to phase 2, so phase 2's gradient of
    it reaches phase 1's backward, which adds it in a kernel: autograd adds no [B, H, NC, C, *]
    gradients (the per-token gates' [B, H, NC, C] ones are all it sums)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    inputs = make_inputs(1, 150, 2, 32, 48, dtype=torch.float16)
    o = chunk_osdn(**inputs, use_qk_l2norm_in_kernel=True)[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        o.backward(torch.ones_like(o))
    adds = [
        e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::add", "aten::add_")
    ]
    assert adds, "the profiler recorded no adds at all, so it saw nothing"  # beta's, at least
    assert not [s for s in adds if any(len(shape) == 5 for shape in s)], adds


def test_compile_times_script_compiles_the_ops_kernels_for_hopper(tmp_path):
    """scripts/compile_times.py records the op's launches through the interpreter and compiles
    them for sm_90 with the wheel's own ptxas (no GPU): a kernel's row says how long it took, and
    which pointers it was compiled as 16-byte aligned (as Triton's runtime specializes them)."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script's child sets it
    script = Path(__file__).parents[1] / "scripts" / "compile_times.py"
    cmd = [sys.executable, str(script), "--dtype", "float32", "--head-dim", "32", "--only", "kb_kernel", "--out", out]
    subprocess.run([str(c) for c in [*cmd, "--num-warps", "8"]], env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["target"] == "sm_90" and [r["kernel"] for r in result["rows"]] == ["kb_kernel"]
    row = result["rows"][0]
    assert row["seconds"] > 0 and row["constexprs"]["PRECISION"] == "ieee" and row["constexprs"]["K"] == 32
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0  # cuobjdump's report, parsed
    assert row["options"]["num_warps"] == 8 and result["num_warps"] == 8  # the override, not the launch's 4
    assert {"k", "tinv", "kb"} <= set(row["aligned"])  # fresh tensors' data


def test_launch_settings_are_a_copy_that_results_can_record():
    """What bench/check/profile write beside their figures: the scan and per-chunk tables, as a
    JSON-able copy that later changes to the tables do not reach."""
    settings = tuning.launch_settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["scans"]["precond_bwd"]["split_below"] == tuning.SCAN_TUNING["precond_bwd"]["split_below"]
    settings["scans"]["state_fwd"]["prefetch"] = not settings["scans"]["state_fwd"]["prefetch"]
    assert settings["scans"]["state_fwd"]["prefetch"] != tuning.SCAN_TUNING["state_fwd"]["prefetch"]
    assert settings["grad_storage"] == tuning.GRAD_STORAGE
    assert settings["phase1"] == tuning.PHASE1 and settings["phase1"] is not tuning.PHASE1


def test_grid_profile_runs_each_setting_alone_and_records_a_fault(tmp_path, capsys):
    """`profile_kernels.py --grid` profiles every (warps, tile) setting in its own process: one that
    fails is recorded with its error (here the real child, which finds no GPU), the others keep
    their times, and the fastest setting of each kernel comes from the ones that ran."""
    import argparse

    import profile_kernels

    args = argparse.Namespace(B=1, T=64, H=1, D=32, out=str(tmp_path / "grid.json"))
    times, err = profile_kernels.grid_setting((8, 16), args)  # a real child process, on a machine without CUDA
    assert times == {} and err.startswith("exit ") and "CUDA" in err

    def fake(setting, args):  # 8 warps at 16-wide tiles faults; elsewhere wider tiles are faster
        warps, tile = setting
        if setting == (8, 16):
            return {}, "exit 1: illegal memory access"
        return {f"{name}_kernel": 1000.0 / tile + warps for name in tuning.CHUNK_LAUNCH}, None

    result = profile_kernels.grid(args, {"commit": "abc"}, measure=fake)
    failed = [r for r in result["rows"] if r["error"]]
    assert {(r["num_warps"], r["tile"]) for r in failed} == {(8, 16)} and all(r["us"] is None for r in failed)
    assert len(result["rows"]) == len(profile_kernels.GRID) * len(tuning.CHUNK_LAUNCH)
    assert result["fastest"]["wy_fwd"] == dict(num_warps=4, tile=64, us=1000.0 / 64 + 4)
    assert json.loads((tmp_path / "grid.json").read_text())["rows"] == result["rows"]  # written as it went

    # --gpus 2: two settings at a time, each on a GPU no other setting holds meanwhile; same rows
    import threading
    import time

    held, lock = set(), threading.Lock()

    def fake_on(setting, args, gpu):
        with lock:
            assert gpu in (0, 1) and gpu not in held
            held.add(gpu)
        time.sleep(0.01)
        with lock:
            held.discard(gpu)
        return fake(setting, args)

    args.gpus = 2
    assert profile_kernels.grid(args, {"commit": "abc"}, measure=fake_on)["rows"] == result["rows"]

    for bad, name in ((["--grid", "--gpus", "0"], "--gpus"), (["--peer", "--narrow-v", "64", "0"], "--narrow-v")):
        with pytest.raises(SystemExit):
            profile_kernels.main(bad)
        assert f"error: {name}" in capsys.readouterr().err  # refused, naming what was wrong

    # its heat map: drawn from the rows, the faulted setting marked
    png = tmp_path / "grid.png"
    profile_kernels.plot_grid(dict(result, device="test"), str(png))
    assert png.stat().st_size > 10_000


def test_relayout_warps_come_from_the_launch_table(monkeypatch):
    """The relayouts' warps: by size unless `CHUNK_LAUNCH` names them (as `--grid` does)."""
    assert chunk_fused._relayout_launch("from_chunks", 64, 64)["num_warps"] == 4  # 4096 elements a chunk
    assert chunk_fused._relayout_launch("from_chunks", 128, 64)["num_warps"] == 8  # 8192
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "from_chunks", dict(num_warps=4, tile=None))
    assert chunk_fused._relayout_launch("from_chunks", 128, 64)["num_warps"] == 4
    assert chunk_fused._relayout_launch("to_chunks", 128, 64)["num_warps"] == 8


def test_grid_setting_runs_every_block_at_its_tile(monkeypatch, capsys):
    """A `--grid` child (`--grid-one warps,tile`) runs every kernel at that one setting, its V
    blocks too: out_fwd's `tile_v` does not survive into it."""

    import profile_kernels

    for name, entry in tuning.CHUNK_LAUNCH.items():  # profile_kernels changes the entries in place
        monkeypatch.setitem(tuning.CHUNK_LAUNCH, name, dict(entry))
    assert "tile_v" in tuning.CHUNK_LAUNCH["out_fwd"]
    seen = {}
    monkeypatch.setattr(profile_kernels, "_step", lambda *a: None)
    monkeypatch.setattr(
        profile_kernels,
        "kernel_times",
        lambda step: seen.update(out_fwd=chunk_fused._chunk_launch("out_fwd", 128, 128, "tf32")) or {},
    )
    profile_kernels.main(["--grid-one", "2,32"])
    assert seen["out_fwd"] == dict(BK=32, BV=32, num_warps=2)
    assert all((t["num_warps"], t["tile"]) == (2, 32) and "tile_v" not in t for t in tuning.CHUNK_LAUNCH.values())
    assert profile_kernels.GRID_MARK in capsys.readouterr().out


def test_ncu_csv_becomes_json_per_launch(tmp_path):
    """`profile_kernels.py --ncu-json`: ncu's details CSV (after its own '==PROF==' lines) as one
    entry per launch, in launch order, each metric under its section with its unit."""
    import profile_kernels

    head = '"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","wy_fwd_kernel","(128, 1, 1)","(4096, 1, 1)","GPU Speed Of Light Throughput","Duration","us","378.5"',
        '"0","wy_fwd_kernel","(128, 1, 1)","(4096, 1, 1)","Launch Statistics","Registers Per Thread","reg","255"',
        '"1","out_fwd_kernel","(128, 1, 1)","(2, 4096, 1)","GPU Speed Of Light Throughput","Duration","us","110.2"',
    ]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(["==PROF== Connected to process 1", head, *rows]) + "\n")
    result = profile_kernels.ncu_json(str(path), {"commit": "abc"})
    assert [x["kernel"] for x in result["launches"]] == ["wy_fwd_kernel", "out_fwd_kernel"]
    wy = result["launches"][0]
    assert wy["sections"]["Launch Statistics"]["Registers Per Thread"] == ["255", "reg"]
    assert wy["sections"]["GPU Speed Of Light Throughput"]["Duration"] == ["378.5", "us"]
    assert wy["grid"] == "(4096, 1, 1)" and result["commit"] == "abc"


def test_loops_stay_plain_loops_for_float32_above_head_dim_128(monkeypatch):
    """`UNROLL` off, not pipelined (STAGES 1), wherever unrolled code took many minutes to compile:
    float32 ("ieee") products at head dims above 128. Elsewhere a kernel with the switch walks its blocks
    as the launch table says: unrolled (`stages` None) or as a loop pipelined `stages` deep. The
    (256, 256) float32 case of `test_fused_chunk_kernels_match_torch_chunk_path` runs plain loops;
    its other cases run the table's."""
    assert not chunk_fused._unrolled("ieee", 256, 256) and not chunk_fused._unrolled("ieee", 64, 160)
    assert chunk_fused._unrolled("ieee", 128, 128) and chunk_fused._unrolled("ieee", 128)
    assert chunk_fused._unrolled("tf32", 256, 256)
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "wy_bwd", dict(num_warps=4, tile=64, stages=3))
    assert chunk_fused._chunk_launch("wy_bwd", 256, 256, "ieee") == dict(
        BK=64, BV=64, num_warps=4, UNROLL=False, STAGES=1
    )
    for precision in ("ieee", "tf32"):
        launch = chunk_fused._chunk_launch("wy_bwd", 128, 128, precision)
        assert (launch["UNROLL"], launch["STAGES"]) == (False, 3)
    monkeypatch.setitem(tuning.CHUNK_LAUNCH, "wy_bwd", dict(num_warps=4, tile=64, stages=None))
    launch = chunk_fused._chunk_launch("wy_bwd", 256, 256, "tf32")
    assert (launch["UNROLL"], launch["STAGES"]) == (True, 1)
    assert "UNROLL" not in chunk_fused._chunk_launch("out_fwd", 128, 128, "tf32")  # no loop switch


def test_float32_products_launch_with_their_own_settings_up_to_head_dim_128():
    """`IEEE_LAUNCH`'s tiles and warps replace the tables' for float32 products ("ieee") at head
    dims up to 128, after phase 1's own (`small`); 16-bit products (tf32) and wider heads keep the
    tables'; a kernel's loop switch still comes from the table. Tf32 products on float32 storage
    take `TF32_LAUNCH`'s for the phase-2 kernels it names."""
    ieee = tuning.IEEE_LAUNCH["chunk"]
    assert chunk_fused._chunk_launch("out_fwd", 128, 128, "ieee") == dict(
        BK=ieee["out_fwd"]["tile"], BV=ieee["out_fwd"]["tile"], num_warps=ieee["out_fwd"]["num_warps"]
    )
    table = tuning.CHUNK_LAUNCH["out_fwd"]
    for args in ((128, 128, "tf32"), (256, 256, "ieee"), (128, 256, "ieee")):
        launch = chunk_fused._chunk_launch("out_fwd", *args)
        assert launch["num_warps"] == table["num_warps"] and launch["BK"] == min(args[0], table["tile"]), args
    # out_fwd's V block: V whole up to `tile_v` (128) for 16-bit storage (of43_a0c78d4.json), else
    # `tile`, as for float32's
    assert (table["tile"], table["tile_v"]) == (64, 128)
    for args, BV in (
        ((128, 128, "tf32"), 128),
        ((32, 100, "tf32"), 128),
        ((128, 48, "tf32"), 64),
        ((256, 256, "tf32"), 64),
    ):
        assert chunk_fused._chunk_launch("out_fwd", *args)["BV"] == BV, args
    for args in ((256, 256, "tf32", False, True), (256, 256, "ieee", False, True), (128, 128, "tf32", False, True)):
        assert chunk_fused._chunk_launch("out_fwd", *args)["BV"] == 64, args
    pre_y = chunk_fused._chunk_launch("pre_y", 128, precision="ieee", small=True)
    assert (pre_y["BK"], pre_y["num_warps"]) == (ieee["pre_y"]["tile"], ieee["pre_y"]["num_warps"])
    assert chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True)["BK"] == 128  # PHASE1's
    for name in ("pre_intra_fwd", "pre_out_bwd", "pre_intra_bwd"):  # 2 warps, tile 32 (sweep27_736557f.json)
        launch = chunk_fused._chunk_launch(name, 128, precision="ieee", small=True)
        assert (launch["BK"], launch["num_warps"]) == (32, 2), (name, launch)
    wy_bwd = chunk_fused._chunk_launch("wy_bwd", 128, 128, "ieee")
    assert (wy_bwd["BK"], wy_bwd["BV"], wy_bwd["num_warps"]) == (16, 16, ieee["wy_bwd"]["num_warps"])
    assert wy_bwd["STAGES"] == tuning.CHUNK_LAUNCH["wy_bwd"]["stages"]
    # tf32 products on float32 storage (float32 inputs under TF32): `TF32_LAUNCH`'s for phase 2's
    # kernels it names (sweep33_737c347.json), the tables' for the rest, for 16-bit storage and at
    # head dims above 128
    tf32 = tuning.TF32_LAUNCH["chunk"]
    for name in ("wy_fwd", "out_bwd", "state_grads", "wy_bwd", "out_fwd", "kb"):
        launch = chunk_fused._chunk_launch(name, 128, 128, "tf32", float32=True)
        want = dict(tuning.CHUNK_LAUNCH[name], **tf32.get(name, {}))
        assert (launch["BK"], launch["num_warps"]) == (want["tile"], want["num_warps"]), (name, launch)
        for args in ((128, 128, "tf32"), (256, 256, "tf32", False, True)):
            got, plain = chunk_fused._chunk_launch(name, *args), chunk_fused._chunk_launch(name, *args[:3])
            if name == "out_fwd":  # its `tile_v` is 16-bit storage's alone (above)
                got.pop("BV"), plain.pop("BV")
            assert got == plain, name
    assert (tf32["wy_bwd"]["tile"], tf32["out_bwd"]["tile"]) == (32, 32)
    assert chunk_fused._chunk_launch("wy_bwd", 128, 128, "tf32", float32=True) != chunk_fused._chunk_launch(
        "wy_bwd", 128, 128, "tf32"
    )
    pre_y = chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True, float32=True)
    assert pre_y == chunk_fused._chunk_launch("pre_y", 128, precision="tf32", small=True)  # phase 1: PHASE1's


def test_launch_key_follows_what_triton_specializes_on():
    """One key per specialization Triton would compile: dtypes, 16-byte alignment (no key for an
    unaligned pointer), integers by 1 / multiple of 16 / width, None, floats and bools."""
    from osdn_hf.ops.osdn.launch import launch_key

    x, h = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    base = launch_key((x, 5, 0.5, None, True))
    assert base == launch_key((torch.ones(8), 7, 0.25, None, True))  # same specialization, other values
    others = [
        (h, 5, 0.5, None, True),
        (x, 1, 0.5, None, True),
        (x, 32, 0.5, None, True),
        (x, 2**40, 0.5, None, True),
        (x, 2**63, 0.5, None, True),
        (x, 5, 1, None, True),
        (x, 5, 0.5, x, True),
        (x, 5, 0.5, None, False),
    ]
    keys = [launch_key(a) for a in others]
    assert base not in keys and len(set(keys)) == len(keys)
    assert launch_key((x[1:], 5)) is None  # 4 bytes past an aligned address
    with pytest.raises(TypeError, match="str"):
        launch_key((x, "5"))


class _FakeCompiled:
    """Stands for Triton's CompiledKernel: `compiled[grid](*args)` records the launch."""

    packed_metadata = None

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        assert len(grid) == 3, "a compiled kernel's runner reads grid[0], grid[1] and grid[2]"
        return lambda *args: self.log.append(("compiled", grid, args))


class _FakeKernel:
    """Stands for a JITFunction `f(a, n, C: constexpr, D: constexpr = 9)`: `kernel[grid](...)`
    records the launch and returns a compiled kernel, or None as Triton's interpreter does."""

    params = [
        SimpleNamespace(name="a", is_constexpr=False, default=inspect.Parameter.empty),
        SimpleNamespace(name="n", is_constexpr=False, default=inspect.Parameter.empty),
        SimpleNamespace(name="C", is_constexpr=True, default=inspect.Parameter.empty),
        SimpleNamespace(name="D", is_constexpr=True, default=9),
    ]

    def __init__(self, interpreted=False):
        self.log, self.interpreted = [], interpreted

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return None if self.interpreted else _FakeCompiled(self.log)

        return run


def test_kernel_launcher_relaunches_the_compiled_kernel_per_key():
    from osdn_hf.ops.osdn.launch import KernelLauncher

    kernel = _FakeKernel()
    launch = KernelLauncher(kernel)
    x, y = torch.zeros(8), torch.ones(8)
    meta = dict(D=2, C=3, num_warps=4)  # constexprs in any order, options too
    launch((2,), (x, 5), meta)
    launch((3,), (y, 7), meta)  # same key: straight to the compiled kernel, constexprs in order
    launch((3,), (y, 16), meta)  # a multiple of 16: Triton compiles another kernel
    launch((3,), (y, 7), dict(meta, C=4))  # another constexpr
    launch((3,), (x[1:], 7), meta)  # unaligned: no key, Triton's own launch every time
    launch((3,), (x[1:], 7), meta)
    assert [e[0] for e in kernel.log] == ["jit", "compiled", "jit", "jit", "jit", "jit"]
    assert kernel.log[1] == ("compiled", (3, 1, 1), (y, 7, 3, 2))
    assert kernel.log[2][2:] == ((y, 16), meta)
    assert len(launch.compiled) == 3

    interpreted = _FakeKernel(interpreted=True)
    launch = KernelLauncher(interpreted)
    for _ in range(2):
        launch((1,), (x, 5), meta)
    assert [e[0] for e in interpreted.log] == ["jit", "jit"] and not launch.compiled


def test_kernel_launcher_fills_defaults_and_keeps_no_runtime_argument():
    """A constexpr left to its default is passed with that default; a runtime argument given by
    name or a constexpr given by position is never kept (the key would not hold its value), so
    it goes through Triton."""
    from osdn_hf.ops.osdn.launch import KernelLauncher, enqueue

    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    x = torch.zeros(8)
    for _ in range(2):
        launcher((2,), (x, 5), dict(C=3))
    assert kernel.log[1] == ("compiled", (2, 1, 1), (x, 5, 3, 9))
    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    for n in (5, 7):
        launcher((2,), (x,), dict(n=n, C=3))
    assert [e[0] for e in kernel.log] == ["jit", "jit"] and not launcher.compiled
    assert kernel.log[1][3] == dict(n=7, C=3)
    kernel = _FakeKernel()
    launcher = KernelLauncher(kernel)
    for c in (3, 5):  # a constexpr passed by position
        launcher((2,), (x, 7, c), {})
    assert [e[0] for e in kernel.log] == ["jit", "jit"] and not launcher.compiled

    kernel = _FakeKernel()  # `enqueue` keeps one launcher per kernel
    for n in (5, 7):
        enqueue(kernel, (4, 2), x, n, C=3, num_warps=4)
    assert kernel.log[1] == ("compiled", (4, 2, 1), (x, 7, 3, 9))


class _FakeRunCompiled(_FakeCompiled):
    """A compiled kernel with what its runner passes to the kernel's launcher (`run`, `function`,
    `packed_metadata`), as Triton's own have."""

    function, packed_metadata = "fn", "meta"

    def run(self, *args):
        self.log.append(("run", args))


def test_kernel_launcher_calls_the_launcher_directly_unless_a_launch_hook_is_registered(monkeypatch):
    """A kept kernel is launched as its runner would launch it (grid, the current stream, its
    function and metadata, no launch metadata or hooks, then the arguments and constexprs); with
    a launch hook registered (a profiler's), through the runner, which calls the hooks."""
    from triton import knobs

    from osdn_hf.ops.osdn import launch as launch_mod

    kernel = _FakeKernel()  # its first launch (compiling) hands back the stand-in below, unlogged
    monkeypatch.setattr(_FakeKernel, "__getitem__", lambda self, grid: lambda *a, **m: _FakeRunCompiled(self.log))
    monkeypatch.setattr(launch_mod, "_current_stream", lambda: 77)
    launcher = launch_mod.KernelLauncher(kernel)
    x = torch.zeros(8)
    launcher((2, 3), (x, 5), dict(C=3))  # compiles (here: keeps the stand-in)
    launcher((2, 3), (x, 5), dict(C=3))
    assert kernel.log == [("run", (2, 3, 1, 77, "fn", "meta", None, None, None, x, 5, 3, 9))]
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher((2, 3), (x, 5), dict(C=3))
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert kernel.log[-1] == ("compiled", (2, 3, 1), (x, 5, 3, 9))
    launcher((2, 3), (x, 5), dict(C=3))
    assert kernel.log[-1][0] == "run"


def test_direct_launch_only_where_the_runner_calls_the_launcher_so(monkeypatch):
    """The installed Triton's compiled-kernel runner calls the kernel's launcher as the direct
    launch does (a Triton that changes that fails here first). A runner that passes the arguments
    otherwise (here, dropping None ones) or whose source cannot be read keeps kept kernels
    launching through the runner."""
    from osdn_hf.ops.osdn import launch as launch_mod

    check = launch_mod._runner_calls_launcher_as_kept
    check.cache_clear()
    assert check()
    compiled = _FakeRunCompiled([])
    assert launch_mod._direct_launch(compiled) == (compiled.run, "fn", "meta")
    dropping = """
    def __getitem__(self, grid):
        def runner(*args, stream=None):
            launch_metadata = self.launch_metadata(grid, stream, *args)
            filtered_args = tuple(arg for arg in args if arg is not None)
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *filtered_args)
        return runner
"""

    def unreadable(obj):
        raise OSError("could not get source code")

    try:
        for source in (lambda obj: dropping, unreadable):
            check.cache_clear()
            monkeypatch.setattr(launch_mod.inspect, "getsource", source)
            assert not check() and launch_mod._direct_launch(compiled) is None
            kernel = _FakeKernel()
            monkeypatch.setattr(
                _FakeKernel, "__getitem__", lambda self, grid: lambda *a, **m: _FakeRunCompiled(self.log)
            )
            launcher = launch_mod.KernelLauncher(kernel)
            for _ in range(2):
                launcher((2, 3), (torch.zeros(8), 5), dict(C=3))
            assert [e[0] for e in kernel.log] == ["compiled"]  # the kept kernel, through its runner
    finally:
        monkeypatch.undo()
        check.cache_clear()
