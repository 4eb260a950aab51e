"""`LiveBytes` counts what the CUDA allocator would, and the op's Triton path stays within its
measured memory (interpreted on the CPU: the buffers are the same as on the GPU)."""

import os

import pytest
import torch

from osdn_hf.memory import LiveBytes
from osdn_hf.ops import chunk_osdn
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV


def test_live_bytes_counts_new_storages_once_and_frees_them():
    x = torch.ones(256)  # made before the block: never counted
    with LiveBytes() as mem:
        y = x * 2  # 1 KiB
        view, same = y[:10], y.view(16, 16)  # views allocate nothing
        y.add_(1)  # in place: nothing
        x.mul_(1)
        assert mem.now == 1024
        z = torch.cat([y, y])  # 2 KiB
        assert (mem.now, mem.peak) == (3072, 3072)
        del y
        assert mem.now == 3072, "the views still hold y's storage"
        del view, same
        assert mem.now == 2048
        del z
    assert (mem.now, mem.peak) == (0, 3072)


def test_live_bytes_follows_autograd_saved_tensors():
    w = torch.randn(64, 64, requires_grad=True)
    with LiveBytes() as mem:
        h = (w @ w).sin()  # w @ w is saved by sin's backward: 16 KiB, and h 16 KiB
        held = mem.now
        h.sum().backward()
        del h
    assert held == 2 * 64 * 64 * 4
    assert mem.now == 64 * 64 * 4  # w.grad, made inside the block
    assert mem.peak >= held


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors reach the kernels only through the interpreter (conftest.py enables it without a GPU); "
    "on a GPU scripts/bench_kernels.py measures the peak",
)
def test_op_memory_within_its_budget(monkeypatch):
    """One forward+backward at B=1, T=256, H=2, K=V=128 in float16, counted in X, one [B, T, H, 128]
    16-bit tensor. Kb and Y were saved for the backward and the states freed after the last
    kernel's outputs came until this test's change: 9.6 X held after the forward, 23.6 X peak."""
    pytest.importorskip("triton")
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    B, T, H, D = 1, 256, 2, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float16).requires_grad_() for _ in range(3))
    beta, eta, lam = (torch.rand(B, T, H, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, T, H, D, generator=g, dtype=torch.float16)
    with LiveBytes() as mem:
        o = chunk_osdn(q, k, v, beta, eta, lam, use_qk_l2norm_in_kernel=True)[0]
        held = mem.now
        o.backward(do)
        del o
    x = B * T * H * D * 2
    # held: q, k (twice), w, U, o, the two inverses (1.5 X), the initial state and small vectors
    print(f"held {held / x:.2f} X, peak {mem.peak / x:.2f} X")
    assert held / x < 7.7, held / x
    assert mem.peak / x < 20.7, mem.peak / x
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the script runs the kernels through the interpreter (conftest.py enables it without a GPU)",
)
def test_op_memory_script_extrapolates_consistently(tmp_path):
    """scripts/op_memory.py assumes every buffer grows linearly with T (chunked tensors) or not at
    all (states): two pairs of lengths must then give the same figure at the benchmark's shape."""
    import json
    import subprocess
    import sys

    figures = []
    for lengths in (("64", "128"), ("128", "256")):
        out = tmp_path / f"mem_{lengths[0]}.json"
        cmd = [sys.executable, "scripts/op_memory.py", "--out", str(out), "--lengths", *lengths]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TRITON_INTERPRET": "1"})
        figures.append(json.loads(out.read_text())["at_bench_mib"])
    for key in ("after_forward", "peak", "grads"):
        assert abs(figures[0][key] - figures[1][key]) < 1.0, (key, figures)
    assert figures[1]["grads"] == pytest.approx(3 * 64 + 3 * 0.5, abs=0.1)  # q, k, v (64 MiB each), the 3 gates
    assert figures[1]["after_forward"] < figures[1]["peak"]
