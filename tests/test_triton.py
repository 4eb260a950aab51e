"""The Triton kernels against their torch twins, on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, make_inputs

pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
if torch.cuda.is_available():
    pytest.skip(
        "CPU tensors reach Triton only through the interpreter, which conftest.py enables on machines "
        "without a GPU; on a GPU run scripts/check_kernels.py",
        allow_module_level=True,
    )

from osdn_hf.ops import chunk_osdn, fused_recurrent_osdn  # noqa: E402
from osdn_hf.ops.osdn import chunk_scan  # noqa: E402
from osdn_hf.ops.osdn.utils import FORCE_TRITON_ENV  # noqa: E402


def _scan_inputs(B, H, NC, C, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    prec = dict(
        y=r(B, H, NC, C, K) * 0.1,
        u=r(B, H, NC, C, K).abs() * 0.1,
        dm=r(B, H, NC, C),
        p=torch.rand(B, H, NC, C, generator=g),
        gc=torch.rand(B, H, NC, generator=g),
        e0=r(B, H, K),
    )
    state = dict(kb=r(B, H, NC, C, K) * 0.1, w=r(B, H, NC, C, K) * 0.1, ub=r(B, H, NC, C, V), s0=r(B, H, K, V))
    leaf = lambda d: {n: x.requires_grad_() for n, x in d.items()}  # noqa: E731
    return leaf(prec), leaf(state)


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g) for o in outputs]
    return torch.autograd.grad(outputs, list(inputs.values()), cot)


@pytest.mark.parametrize("K, V", [(32, 32), (64, 48), (100, 128), (128, 64), (256, 256)])
def test_scans_match_torch_twins(K, V):
    """Forward and hand-written backward of both scans, head dims 32 to 256, odd sizes masked."""
    prec, state = _scan_inputs(2, 2, 3, 64, K, V)
    ref = chunk_scan.precond_scan_torch(**prec)
    got = chunk_scan.PrecondScan.apply(*prec.values())
    for name, a, b in zip(("e_starts", "e_final"), got, ref):
        assert_close(name, a, b)
    for name, a, b in zip(prec, _grads(got, prec), _grads(ref, prec)):
        assert_close(f"d{name}", a, b)

    ref = chunk_scan.state_scan_torch(**state)
    got = chunk_scan.StateScan.apply(*state.values(), "ieee")
    for name, a, b in zip(("U", "S_starts", "S_final"), got, ref):
        assert_close(name, a, b)
    for name, a, b in zip(state, _grads(got, state), _grads(ref, state)):
        assert_close(f"d{name}", a, b)


def test_forced_triton_path_runs_the_kernels(monkeypatch):
    """The switch reaches the kernels (the op tests' 'triton' runs are not the torch path again)."""
    calls = []
    for name in ("PrecondScan", "StateScan", "FusedRecurrentOSDNFunction"):
        module = (
            chunk_scan
            if name != "FusedRecurrentOSDNFunction"
            else __import__("osdn_hf.ops.osdn.fused_recurrent", fromlist=[name])
        )
        cls = getattr(module, name)
        monkeypatch.setattr(cls, "apply", (lambda f, n: lambda *a: calls.append(n) or f(*a))(cls.apply, name))
    inputs = {n: (x.detach() if x is not None else None) for n, x in make_inputs(1, 70, 2, 32, 32).items()}
    chunk_osdn(**inputs)
    fused_recurrent_osdn(**inputs)
    assert calls == []  # CPU tensors take the torch path by default
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")
    chunk_osdn(**inputs)
    fused_recurrent_osdn(**inputs)
    assert calls == ["PrecondScan", "StateScan", "FusedRecurrentOSDNFunction"]
