"""Building blocks of the OSDN layer and block: short convolution, RMSNorms, SwiGLU MLP, and the
packing of padded batches.

Parameter names and shapes follow flash-linear-attention's modules, so DeltaNet weights load
onto them by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.linear_step import linear_step_applies, swiglu_step
from ..ops.osdn.utils import pad_varlen, unpad_varlen, varlen_index
from ..ops.short_conv import short_conv_step, short_conv_step_applies
from ..ops.step import plain_module
from ..ops.swiglu import silu_mul, silu_mul_applies


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time, then SiLU, with a cache for decoding.

    The cache holds the last `kernel_size - 1` inputs of every sequence, oldest first:
    `[N, D, kernel_size - 1]`, so decoding one token needs no history beyond it.
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=0, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: `[B, T, D]` (B = 1 with `cu_seqlens`); cache: `[N, D, W - 1]` or None.

        Returns `silu(conv(x))` `[B, T, D]` and the new cache `[N, D, W - 1]`. With `inplace` the
        new cache is written over `cache` and returned as it, where `cache` is contiguous, in the
        inputs' dtype and outside autograd (decoding; the caller checks the last); otherwise it
        is a new tensor. A one-token step in place on Triton's device is one kernel
        (`ops/short_conv.py`).
        """
        W = self.kernel_size[0]
        if inplace and cu_seqlens is None:
            out_dtype = self._out_dtype(x)
            if short_conv_step_applies(x, cache, self.weight, out_dtype):  # one Triton kernel
                return short_conv_step([x], [cache], [self.weight], [self.bias], out_dtype)[0], cache
        if cu_seqlens is None:
            xs, lengths = x, None
        else:
            dest, L = varlen_index(cu_seqlens)
            xs = pad_varlen(x, dest, len(cu_seqlens) - 1, L)  # (N, L, D), zeros after each end
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        N, L, D = xs.shape
        history = xs.new_zeros(N, W - 1, D) if cache is None else cache.transpose(1, 2).to(xs.dtype)
        xcat = torch.cat([history, xs], dim=1)  # (N, W - 1 + L, D)
        y = F.silu(self._one_step(xcat) if L == 1 else self._convolve(xcat))  # (N, L, D)
        if lengths is None:
            new_cache = xcat[:, xcat.shape[1] - (W - 1) :]
        else:
            # The last W - 1 inputs of each sequence sit at xcat[n, len_n : len_n + W - 1].
            idx = lengths[:, None] + torch.arange(W - 1, device=x.device)  # (N, W - 1)
            new_cache = xcat.gather(1, idx[..., None].expand(-1, -1, D))
            y = unpad_varlen(y, dest)
        new_cache = new_cache.transpose(1, 2)  # (N, D, W - 1)
        if inplace and cache is not None and cache.dtype == xs.dtype and cache.is_contiguous():
            return y, cache.copy_(new_cache)
        return y, new_cache.contiguous()

    def _convolve(self, xcat: torch.Tensor) -> torch.Tensor:
        """The convolution's outputs `[N, L, D]` from `xcat` `[N, W - 1 + L, D]`, by `F.conv1d`."""
        return F.conv1d(xcat.transpose(1, 2), self.weight, self.bias, groups=xcat.shape[-1]).transpose(1, 2)

    def _one_step(self, xcat: torch.Tensor) -> torch.Tensor:
        """The convolution's one output `[N, 1, D]` from its W inputs `xcat` `[N, W, D]`, as a
        multiply and a sum in float32 (float64 for float64 inputs), rounded once to the dtype
        `F.conv1d` would return (the autocast dtype where autocast is on). Same result to
        rounding; on a 2-core CPU one step took 26-32 us this way against 147-170 us as a depthwise
        `F.conv1d` (benchmarks/results/decode_conv_cpu.json)."""
        acc = torch.promote_types(xcat.dtype, torch.float32)  # float64 stays float64
        y = (xcat.to(acc) * self.weight[:, 0, :].t().to(acc)).sum(1, keepdim=True)
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return y.to(self._out_dtype(xcat))

    @staticmethod
    def _out_dtype(x: torch.Tensor) -> torch.dtype:
        """The dtype `F.conv1d` returns for inputs like x: the autocast dtype where autocast is on."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def short_conv_steps_in_place(
    convs: Sequence[ShortConvolution], xs: Sequence[torch.Tensor], caches: Sequence[torch.Tensor | None]
) -> list[torch.Tensor] | None:
    """One-token decoding steps of up to three convolutions of one width (a layer's q, k and v),
    their caches updated in place, in one Triton kernel: each conv's `forward(x, cache,
    inplace=True)[0]`. None where that kernel does not take all of them (then call each): among
    others, where one is wrapped (an adapter) or has hooks, which only its own call runs."""
    W, out_dtype, first = convs[0].kernel_size[0], ShortConvolution._out_dtype(xs[0]), xs[0]
    if len(convs) > 3 or any(
        not plain_module(c, ShortConvolution)
        or c.kernel_size[0] != W
        or x.dtype != first.dtype
        or x.shape[0] != first.shape[0]
        or not short_conv_step_applies(x, cache, c.weight, out_dtype)
        for c, x, cache in zip(convs, xs, caches, strict=True)
    ):
        return None
    return short_conv_step(xs, caches, [c.weight for c in convs], [c.bias for c in convs], out_dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and returned in the input dtype.

    Where the input and the weight share a dtype this is `F.rms_norm`, the same formula as one
    fused kernel (the same bits on the CPU; on a GPU the reduction's order may differ in the last
    bit). A decoding step calls three norms a layer, and each was nine small kernels.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """`RMSNorm(x) * silu(g)`, the output norm of the gated layer variant."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (super().forward(x).float() * F.silu(g.float())).to(x.dtype)


class SwiGLUMLP(nn.Module):
    """`down_proj(silu(gate_proj(x)) * up_proj(x))`. Where no gradient is wanted, on Triton's
    device, `silu(...) * up_proj(x)` is one kernel (`ops/swiglu.py`), and for a few rows (a
    decoding step) one kernel with the two projections (`ops/linear_step.py`)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if linear_step_applies(x, (self.gate_proj, self.up_proj)):
            return self.down_proj(swiglu_step(x, self.gate_proj, self.up_proj))
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up) if silu_mul_applies(gate, up) else F.silu(gate) * up)


def pack_padding(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real tokens of a padded batch, packed: x `[B, T, ...]`, mask `[B, T]` of 0/1.

    Returns the packed tokens `[1, total, ...]`, their rows in `x.flatten(0, 1)` `[total]` and
    `cu_seqlens` `[B + 1]` (int64; a row without real tokens is an empty sequence).
    """
    mask = mask.bool()
    indices = mask.flatten().nonzero().squeeze(-1)  # (total,)
    lengths = mask.sum(-1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return x.flatten(0, 1).index_select(0, indices).unsqueeze(0), indices, cu_seqlens


def pack_if_padded(
    x: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(x, indices, cu_seqlens)`: x `[B, T, ...]` packed by `pack_padding` when the last T columns
    of `attention_mask` pad (one wait on the GPU to ask), else x, None and `cu_seqlens` as given.

    Raises `ValueError` for a mask that does not cover x's B rows and T tokens, and for a padding
    mask together with `cu_seqlens`.
    """
    B, T = x.shape[:2]
    if attention_mask is not None and (attention_mask.shape[0] != B or attention_mask.shape[-1] < T):
        raise ValueError(
            f"`attention_mask` must be [batch, past + seq_len] with batch = {B} and at least seq_len = {T} "
            f"columns, got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask is None or bool(attention_mask[:, -T:].all()):
        return x, None, cu_seqlens
    if cu_seqlens is not None:
        raise ValueError("pass either `cu_seqlens` or an `attention_mask` with padding, not both")
    return pack_padding(x, attention_mask[:, -T:])


def unpack_padding(x: torch.Tensor, indices: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """`pack_padding` undone: `[1, total, ...]` -> `[B, T, ...]`, zeros at the padding."""
    rest = x.shape[2:]
    return x.new_zeros(B * T, *rest).index_copy(0, indices, x[0]).view(B, T, *rest)
