"""The SwiGLU MLP's activation, `silu(gate) * up` (SPEC section 5's MLP), as one Triton kernel.

In PyTorch it is two kernels, SiLU then the multiply, and the SiLU's output makes a round trip
through memory between them: 48 of the 483 kernels of one of osdn-340m's decoding steps
(`benchmarks/results/gen50_b35f5c7.json`). `silu_mul` is one, and reads each input and writes the
output once. It runs wherever no gradient is wanted (decoding, and prompts under `no_grad`); with
`libdevice`'s `expf` and a correctly rounded division on a GPU it computes what PyTorch's CUDA
kernels compute, `x / (1 + exp(-x))` in float32 rounded to the inputs' dtype, then the product in
float32 rounded again, so the same bits. Triton's interpreter has no `libdevice`; there it uses
`tl.exp`.
"""

from __future__ import annotations

import torch

from .osdn.chunk_scan import HAS_TRITON
from .osdn.launch import cdiv, enqueue
from .osdn.utils import use_triton
from .step import STEP_DTYPES

BLOCK = 1024  # elements a program

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _silu(g, LIBDEVICE: tl.constexpr):
        """`g / (1 + exp(-g))` of float32 g as PyTorch's CUDA kernel computes it with LIBDEVICE
        (libdevice's expf, a correctly rounded division); with `tl.exp` and `/` without."""
        if LIBDEVICE:
            return tl.div_rn(g, 1.0 + libdevice.exp(-g))
        else:
            return g / (1.0 + tl.exp(-g))

    @triton.jit
    def silu_mul_kernel(gate, up, y, n, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
        """BLOCK elements a program: `silu(gate)` in float32 rounded to the dtype, times `up` in
        float32, rounded (F.silu, then the multiply)."""
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        g = tl.load(gate + o, mask=m, other=0.0)
        u = tl.load(up + o, mask=m, other=0.0)
        s = _silu(g.to(tl.float32), LIBDEVICE)
        tl.store(y + o, (s.to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    # Triton's interpreter makes its kernels InterpretedFunctions, not JITFunctions
    _INTERPRETED = not isinstance(silu_mul_kernel, triton.runtime.JITFunction)


def silu_mul_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `silu_mul` takes `silu(gate) * up`: Triton's device (CUDA, or its interpreter when
    forced), no gradient wanted, and gate and up of one shape, one 16- or 32-bit float dtype and
    one device, contiguous (float64, mixed dtypes and broadcasting stay in PyTorch)."""
    if not use_triton(gate) or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return False
    return (
        gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.dtype in STEP_DTYPES
        and gate.device == up.device
        and gate.is_contiguous()
        and up.is_contiguous()
    )


@torch.compiler.disable
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` in one kernel, in their dtype. Call it only where `silu_mul_applies`."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        enqueue(
            silu_mul_kernel, (cdiv(n, BLOCK),), gate, up, y, n, BLOCK=BLOCK, LIBDEVICE=not _INTERPRETED, num_warps=4
        )
    return y
