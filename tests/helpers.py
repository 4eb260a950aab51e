"""Shared test helpers: the float64 reference of SPEC section 2, inputs, one assert_close, and a
Python process where the package cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Relative error ||actual - expected|| / ||expected|| allowed per input dtype. float32 ops
# against the float64 loop lose a few ulps per token over a few hundred tokens and through the
# chunk's triangular solves (measured <= 2e-6); 16-bit inputs carry their own rounding
# (2^-11 for float16, 2^-8 for bfloat16) into every product of the recurrence.
RTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
) -> None:
    """Assert a relative (norm-wise) error within RTOL[dtype] (or `rtol`, where a test states its
    own); NaN never passes."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
    rtol = RTOL[dtype] if rtol is None else rtol
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e} ({dtype})"


def reference_osdn_f64(q, k, v, beta, eta, lam, scale=None, S0=None, d0=None):
    """SPEC section 2, token by token in float64, one sequence batch `[B, T, H, *]`.

    Written independently of `osdn_hf.ops` from the equations:
      u = k*k, rho = 1 - beta <d, u>, d = lam (d + eta beta rho u) + (1 - lam),
      w = d*k, S = S + beta w (v - S^T k)^T, o = scale S^T q.
    """
    q, k, v, beta, eta, lam = (x.double() for x in (q, k, v, beta, eta, lam))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if S0 is None else S0.double()
    d = torch.ones(B, H, K, dtype=torch.float64) if d0 is None else d0.double()
    outs = []
    for t in range(T):
        kt, qt, vt = k[:, t], q[:, t], v[:, t]
        bt, et, lt = beta[:, t].unsqueeze(-1), eta[:, t].unsqueeze(-1), lam[:, t].unsqueeze(-1)
        u = kt * kt
        rho = 1 - bt * torch.einsum("bhk,bhk->bh", d, u).unsqueeze(-1)
        d = lt * (d + et * bt * rho * u) + (1 - lt)
        w = d * kt
        pred = torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + bt.unsqueeze(-1) * torch.einsum("bhk,bhv->bhkv", w, vt - pred)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, qt))
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, V, dtype=torch.float64)
    return o, S, d


def make_inputs(B, T, H, K, V, dtype=torch.float32, with_states=False, N=None, seed=0, lam_min=0.1):
    """Random op inputs: unit-norm keys, gates in (0, 1); all leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    eta = torch.rand(B, T, H, generator=g)
    lam = lam_min + (1 - lam_min) * torch.rand(B, T, H, generator=g)
    N = B if N is None else N
    S0 = torch.randn(N, H, K, V, generator=g) * 0.5 if with_states else None
    d0 = 0.5 + torch.rand(N, H, K, generator=g) if with_states else None
    tensors = dict(
        q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), beta=beta, eta=eta, lam=lam, initial_state=S0, initial_precond=d0
    )
    return {name: (x.clone().requires_grad_() if x is not None else None) for name, x in tensors.items()}


def interpreted_triton():
    """Triton, for a test module of the kernels run on CPU tensors; else that module is skipped,
    saying why. Call it at the module's top, before importing the kernels."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
    if torch.cuda.is_available():
        pytest.skip(
            "CPU tensors reach Triton only through the interpreter, which conftest.py enables on machines "
            "without a GPU; on a GPU run scripts/check_kernels.py",
            allow_module_level=True,
        )
    return triton


def run_without_the_package(script: str, folder: Path) -> str:
    """Run `script` in a fresh Python where `import osdn_hf` fails (as where only a checkpoint's
    remote code is at hand), in `folder`, with its own module cache there; assert it succeeds and
    return what it printed."""
    blocked = "import sys\nsys.modules['osdn_hf'] = None  # any import of the package now raises ImportError\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(folder / "modules")
    result = subprocess.run(
        [sys.executable, "-c", blocked + textwrap.dedent(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
