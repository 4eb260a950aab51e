"""A decoding step's projections of a few rows, several weights to one launch, as Triton kernels.

A one-token step multiplies a handful of rows by each weight: a layer's q, k and v projections are
three cuBLAS calls, its MLP's gate and up projections two more and the SiLU-and-multiply a third.
On a GPU each such call reads its weight at a fraction of the memory's bandwidth, and eagerly each
costs the host a launch. `linear_step` does the q, k and v projections in one launch, one program
per block of one weight's output features; `swiglu_step` does `silu(x W_gate^T) * (x W_up^T)` in
one, each program both products of its features, rounded as `nn.Linear` returns them and then as
`F.silu(gate) * up` computes (`ops/swiglu.py`); `norm_linear_step` does a layer's per-head output
norm and output projection in one, each program normalising all of x's heads itself (rounded as
`F.rms_norm` returns them) before its features' product. The sums are float32 (tl.dot), in
another order than cuBLAS's (and the norms' than PyTorch's), so the same to rounding, not to the
bit.

They take `nn.Linear`s without a bias, hooks or a replaced `forward` (so not PEFT's or a quantized
layer, which keep their own), at most `MAX_ROWS` rows, no autocast, and only where no gradient is
wanted (`linear_step_applies`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .osdn.chunk_scan import HAS_TRITON
from .osdn.launch import cdiv, enqueue, next_power_of_2
from .osdn.utils import dot_precision
from .step import few_rows_apply, plain_module, weights_apply

MAX_ROWS = 16  # tl.dot's least block; more rows go to cuBLAS
BK = 256  # the reduction's block
NORM_BK = 512  # `norm_linear_step`'s, whole heads (the best of a sweep for osdn-340m's o_proj, gemv53_83a4cbd)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .swiglu import _INTERPRETED, _silu

    @triton.jit
    def _rows_times_weight(x, w, M, N, K, i_n, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """`x[:M] @ w[i_n * BN : (i_n + 1) * BN]^T` as a float32 `[16, BN]` block (rows past M 0)."""
        o_m = tl.arange(0, 16)
        o_n = i_n * BN + tl.arange(0, BN)
        acc = tl.zeros([16, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k[None, :] < K
            xt = tl.load(x + o_m[:, None] * K + o_k[None, :], mask=(o_m[:, None] < M) & m_k, other=0.0)
            wt = tl.load(w + o_n[:, None].to(tl.int64) * K + o_k[None, :], mask=(o_n[:, None] < N) & m_k, other=0.0)
            acc += tl.dot(xt, tl.trans(wt), input_precision=PREC)
        return acc

    @triton.jit
    def _one_projection(x, w, y, M, N, K, i_n, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        if i_n * BN < N:  # a narrower weight of the launch has no block here
            acc = _rows_times_weight(x, w, M, N, K, i_n, BN, BK, PREC)
            o_m, o_n = tl.arange(0, 16), i_n * BN + tl.arange(0, BN)
            tl.store(y + o_m[:, None] * N + o_n[None, :], acc.to(y.dtype.element_ty), (o_m[:, None] < M) & (o_n < N))

    @triton.jit
    def linear_step_kernel(
        x, w0, y0, N0, w1, y1, N1, w2, y2, N2, M, K,
        BN: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """`y_j = x w_j^T` for NW = 1 to 3 weights (program ids: block of BN output features, weight)."""
        i_n, i_w = tl.program_id(0), tl.program_id(1)
        if i_w == 0:
            _one_projection(x, w0, y0, M, N0, K, i_n, BN, BK, PREC)
        if NW > 1:
            if i_w == 1:
                _one_projection(x, w1, y1, M, N1, K, i_n, BN, BK, PREC)
        if NW > 2:
            if i_w == 2:
                _one_projection(x, w2, y2, M, N2, K, i_n, BN, BK, PREC)

    @triton.jit
    def norm_linear_step_kernel(
        x, g, w, y, M, N, K, eps, BN: tl.constexpr, G: tl.constexpr, NH: tl.constexpr, PREC: tl.constexpr
    ):  # fmt: skip
        """`y = rms_norm(x) w^T` for a block of BN features a program, x's K columns normalised in
        groups of G (a layer's heads), NH groups a step: each group by its own root mean square,
        times g, rounded to x's dtype (as `F.rms_norm` returns it), then multiplied."""
        i_n = tl.program_id(0)
        dt = x.dtype.element_ty
        o_m, o_n, o_k = tl.arange(0, 16), i_n * BN + tl.arange(0, BN), tl.arange(0, NH * G)
        m_m = o_m[:, None] < M
        b_g = tl.load(g + o_k % G).to(tl.float32)
        acc = tl.zeros([16, BN], dtype=tl.float32)
        for k0 in range(0, K, NH * G):
            m_k = k0 + o_k < K  # a last step of fewer heads
            xt = tl.load(x + o_m[:, None] * K + k0 + o_k[None, :], mask=m_m & m_k[None, :], other=0.0)
            xt = tl.reshape(xt.to(tl.float32), (16, NH, G))
            rstd = tl.math.rsqrt(tl.sum(xt * xt, 2) / G + eps)  # [16, NH]
            xn = tl.reshape(xt * rstd[:, :, None], (16, NH * G))
            xn = (xn * b_g[None, :]).to(dt)
            wt = tl.load(
                w + o_n[:, None].to(tl.int64) * K + k0 + o_k[None, :], mask=(o_n[:, None] < N) & m_k[None, :], other=0.0
            )
            acc += tl.dot(xn, tl.trans(wt), input_precision=PREC)
        tl.store(y + o_m[:, None] * N + o_n[None, :], acc.to(y.dtype.element_ty), m_m & (o_n[None, :] < N))

    @triton.jit
    def swiglu_step_kernel(
        x, wg, wu, y, M, N, K, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, LIBDEVICE: tl.constexpr
    ):
        """`y = silu(x wg^T) * (x wu^T)` for a block of BN features a program: each product
        rounded to y's dtype (as `nn.Linear` returns it), then `silu` rounded, then the product
        rounded (as `F.silu(gate) * up`)."""
        i_n = tl.program_id(0)
        dt = y.dtype.element_ty
        g = _rows_times_weight(x, wg, M, N, K, i_n, BN, BK, PREC).to(dt).to(tl.float32)
        u = _rows_times_weight(x, wu, M, N, K, i_n, BN, BK, PREC).to(dt).to(tl.float32)
        s = _silu(g, LIBDEVICE).to(dt).to(tl.float32)
        o_m, o_n = tl.arange(0, 16), i_n * BN + tl.arange(0, BN)
        tl.store(y + o_m[:, None] * N + o_n[None, :], (s * u).to(dt), (o_m[:, None] < M) & (o_n < N))


def linear_step_applies(x: torch.Tensor, linears: Sequence[nn.Module]) -> bool:
    """Whether `linear_step` / `swiglu_step` take `x` `[..., K]` through `linears`: Triton's device
    (CUDA, or its interpreter when forced), 1 to `MAX_ROWS` rows, no gradient wanted, no autocast,
    x in a 16- or 32-bit float dtype, and each a plain `nn.Linear` (not a subclass) without a bias,
    hooks (its own or global) or a replaced `forward`, its weight `[N, K]` a plain tensor (not a
    quantized or distributed subclass), contiguous in x's dtype on x's device. Anything else stays
    with the modules."""
    if not few_rows_apply(x, MAX_ROWS) or x.numel() == 0:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for m in linears:
        if not plain_module(m, nn.Linear) or m.bias is not None:
            return False
        if (grad and m.weight.requires_grad) or m.weight.shape[1] != x.shape[-1]:
            return False
    return weights_apply(x, (m.weight for m in linears))  # not a quantized or distributed weight


def _feature_block(N: int, weights: int) -> int:
    """Output features a program: 32 where that still makes two programs an SM of an H100/H200
    (132 SMs), else 16, which spreads a narrow step's reads over more programs."""
    return 32 if cdiv(N, 32) * weights >= 264 else 16


@torch.compiler.disable
def linear_step(x: torch.Tensor, linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """`[m(x) for m in linears]` (1 to 3) in one launch. Call it only where `linear_step_applies`."""
    if not 1 <= len(linears) <= 3:
        raise ValueError(f"linear_step takes one to three weights, got {len(linears)}")
    K = x.shape[-1]
    M = x.numel() // K
    x = x.contiguous()
    ys = [torch.empty(*x.shape[:-1], m.weight.shape[0], dtype=x.dtype, device=x.device) for m in linears]
    args = [a for m, y in zip(linears, ys, strict=True) for a in (m.weight, y, m.weight.shape[0])]
    args += [None] * (9 - len(args))  # the weights the launch does not have
    N = max(m.weight.shape[0] for m in linears)
    BN = _feature_block(N, len(linears))
    enqueue(
        linear_step_kernel, (cdiv(N, BN), len(linears)), x, *args, M, K,
        BN=BN, BK=BK, NW=len(linears), PREC=dot_precision(x), num_warps=2, num_stages=3,
    )  # fmt: skip
    return ys


@torch.compiler.disable
def swiglu_step(x: torch.Tensor, gate: nn.Linear, up: nn.Linear) -> torch.Tensor:
    """`F.silu(gate(x)) * up(x)` in one launch. Call it only where `linear_step_applies`."""
    K = x.shape[-1]
    M, N = x.numel() // K, gate.weight.shape[0]
    if up.weight.shape[0] != N:
        raise ValueError(f"gate and up must have as many features, got {N} and {up.weight.shape[0]}")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    BN = _feature_block(N, 2)
    enqueue(
        swiglu_step_kernel, (cdiv(N, BN),), x, gate.weight, up.weight, y, M, N, K,
        BN=BN, BK=BK, PREC=dot_precision(x), LIBDEVICE=not _INTERPRETED, num_warps=2, num_stages=3,
    )  # fmt: skip
    return y


def norm_linear_step_applies(x: torch.Tensor, norm_weight: torch.Tensor, linear: nn.Module) -> bool:
    """Whether `norm_linear_step` takes x `[..., H, G]`: G (the norm's width) a power of 2 from 16
    to 256, the norm's weight `[G]` a weight a kernel may read beside x (`weights_apply`) that
    wants no gradient, and x's rows, flattened to `[..., H * G]`, through `linear` as
    `linear_step_applies` takes them. (The caller checks the norm module itself.)"""
    G = x.shape[-1]
    if x.dim() < 2 or norm_weight.shape != (G,) or not 16 <= G <= 256 or G & (G - 1):
        return False
    if torch.is_grad_enabled() and norm_weight.requires_grad:
        return False
    return linear_step_applies(x.flatten(-2), (linear,)) and weights_apply(x, (norm_weight,))


@torch.compiler.disable
def norm_linear_step(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, linear: nn.Linear) -> torch.Tensor:
    """`linear(F.rms_norm(x, (G,), norm_weight, eps).flatten(-2))` for x `[..., H, G]` (a layer's
    per-head output norm and output projection) in one launch. Call it only where
    `norm_linear_step_applies`."""
    G = x.shape[-1]
    x = x.contiguous()
    K = x.shape[-2] * G
    M, N = x.numel() // K, linear.weight.shape[0]
    y = torch.empty(*x.shape[:-2], N, dtype=x.dtype, device=x.device)
    BN = _feature_block(N, 1)
    NH = min(NORM_BK // G, next_power_of_2(K // G))  # heads a step: columns NORM_BK a step, or all
    enqueue(
        norm_linear_step_kernel, (cdiv(N, BN),), x, norm_weight, linear.weight, y, M, N, K, float(eps),
        BN=BN, G=G, NH=NH, PREC=dot_precision(x), num_warps=2, num_stages=3,
    )  # fmt: skip
    return y
