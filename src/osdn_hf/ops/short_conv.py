"""The short convolution's decoding step (SPEC section 5, step 2, one token) as one Triton kernel.

A decoding step convolves each sequence's new input with the `W - 1` cached before it, applies
SiLU, and shifts the cache by one. In PyTorch that is about eight small kernels (`cat`, casts, a
multiply, a sum, SiLU, the cache's copy); `short_conv_step` is one, and one for all three of a
layer's convolutions (q, k and v; `layers.modules.short_conv_steps_in_place`), which matters where
decoding waits on the host to launch kernels, or on many tiny kernels (a step replayed from a CUDA
graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .osdn.chunk_scan import HAS_TRITON
from .osdn.launch import block_width, cdiv, enqueue
from .osdn.utils import use_triton
from .step import STEP_DTYPES, plain_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _conv_step(x, cache, weight, bias, y, D, i_n, i_d, W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """One sequence's block of BD channels of one convolution: `y = silu(round(sum_j w_j x_j +
        b))` over the W inputs (the cache's W - 1, oldest first, then x), summed in float32 and
        rounded to y's dtype before SiLU, as `ShortConvolution` does; then the cache shifts by
        one, x last. Every program reads its own part of the cache before writing it. Blocks past
        D (a narrower convolution of the launch) do nothing."""
        o_d = i_d * BD + tl.arange(0, BD)
        o_w = tl.arange(0, BW)
        m_d = o_d < D
        m_hist = m_d[:, None] & (o_w[None, :] < W - 1)
        rows = (i_n * D + o_d).to(tl.int64)
        xt = tl.load(x + rows, mask=m_d, other=0.0)
        hist = tl.load(cache + rows[:, None] * (W - 1) + o_w[None, :], mask=m_hist, other=0.0)
        w_hist = tl.load(weight + o_d[:, None] * W + o_w[None, :], mask=m_hist, other=0.0)
        w_last = tl.load(weight + o_d * W + (W - 1), mask=m_d, other=0.0)
        acc = tl.sum(hist.to(tl.float32) * w_hist.to(tl.float32), axis=1) + xt.to(tl.float32) * w_last.to(tl.float32)
        if bias is not None:
            acc += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
        a = acc.to(y.dtype.element_ty).to(tl.float32)
        tl.store(y + rows, (a * tl.sigmoid(a)).to(y.dtype.element_ty), mask=m_d)
        # the shift: position j takes j + 1 (read before any write), the last takes x
        m_next = m_d[:, None] & (o_w[None, :] < W - 2)
        nxt = tl.load(cache + rows[:, None] * (W - 1) + o_w[None, :] + 1, mask=m_next, other=0.0)
        tl.store(cache + rows[:, None] * (W - 1) + o_w[None, :], nxt, mask=m_next)
        tl.store(cache + rows * (W - 1) + (W - 2), xt, mask=m_d)

    @triton.jit
    def short_conv_step_kernel(
        x0, cache0, weight0, bias0, y0, D0,
        x1, cache1, weight1, bias1, y1, D1,
        x2, cache2, weight2, bias2, y2, D2,
        W: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, NC: tl.constexpr,
    ):  # fmt: skip
        """One to NC = 3 convolutions of width W in one launch (the layer's q, k and v): program
        ids sequence, block of BD channels, convolution (`_conv_step`). Unused convolutions'
        arguments are None."""
        i_n, i_d, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if i_c == 0:
            _conv_step(x0, cache0, weight0, bias0, y0, D0, i_n, i_d, W, BW, BD)
        if NC > 1:
            if i_c == 1:
                _conv_step(x1, cache1, weight1, bias1, y1, D1, i_n, i_d, W, BW, BD)
        if NC > 2:
            if i_c == 2:
                _conv_step(x2, cache2, weight2, bias2, y2, D2, i_n, i_d, W, BW, BD)


def short_conv_step_applies(x: torch.Tensor, cache: torch.Tensor | None, weight: torch.Tensor, out_dtype) -> bool:
    """Whether `short_conv_step` takes this step: Triton's device (CUDA, or its interpreter when
    forced), one token `[N, 1, D]`, a contiguous cache `[N, D, W - 1]` (W >= 2) in x's dtype, and
    16- or 32-bit floats throughout, plain tensors (float64 and a quantized or distributed weight
    stay in PyTorch)."""
    if cache is None or x.dim() != 3 or x.shape[1] != 1 or not use_triton(x):
        return False
    N, _, D = x.shape
    W = weight.shape[-1]
    return (
        W >= 2
        and cache.shape == (N, D, W - 1)
        and cache.dtype == x.dtype
        and cache.is_contiguous()
        and x.dtype in STEP_DTYPES
        and weight.dtype in STEP_DTYPES
        and out_dtype in STEP_DTYPES
        and weight.is_contiguous()
        and plain_tensor(weight)
        and plain_tensor(cache)
    )


@torch.compiler.disable
def short_conv_step(
    xs: Sequence[torch.Tensor],
    caches: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """`silu(conv)` of one token per sequence for one to three convolutions of one width W in one
    launch: each x `[N, 1, D]`, its cache `[N, D, W - 1]` (updated in place: shifted by one, x
    last), its depthwise weight `[D, 1, W]` and bias `[D]` or None. Returns each `[N, 1, D]` in
    `out_dtype`. Call it only where `short_conv_step_applies` for each, with the same N and W."""
    N, W = xs[0].shape[0], weights[0].shape[-1]
    if not 1 <= len(xs) <= 3 or any(w.shape[-1] != W or x.shape[0] != N for x, w in zip(xs, weights, strict=True)):
        raise ValueError(f"short_conv_step takes one to three convolutions of one width and batch, got {len(xs)}")
    ys = [torch.empty(N, 1, x.shape[-1], dtype=out_dtype, device=x.device) for x in xs]
    D = max(x.shape[-1] for x in xs)
    BD = min(block_width(D), 256)
    args = []
    for x, cache, weight, bias, y in zip(xs, caches, weights, biases, ys, strict=True):
        args += [x.contiguous(), cache, weight, bias, y, x.shape[-1]]
    args += [None] * (18 - len(args))  # the convolutions the launch does not have
    enqueue(
        short_conv_step_kernel, (N, cdiv(D, BD), len(xs)), *args,
        W=W, BW=max(1 << (W - 2).bit_length(), 2), BD=BD, NC=len(xs), num_warps=4,
    )  # fmt: skip
    return ys
