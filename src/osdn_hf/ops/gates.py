"""The layer's gates for a decoding step (SPEC section 5, step 4) as one Triton kernel.

`beta = sigmoid(x W_b^T)`, `eta = eta_max sigmoid(x W_eta^T + b_eta)` and `lam = sigmoid(x W_apf^T +
b_apf)`, each `[..., H]` in float32. In PyTorch that is three projections, three casts to float32,
three sigmoids and a multiply: ten kernels a layer, 240 of the 699 kernels of one of osdn-340m's
decoding steps (`benchmarks/results/decode_graph_5d14bf0.json`). `gates_step` is one, for the few
tokens of a decoding step, which matters where decoding waits on the host to launch kernels, or
on many tiny kernels (a step replayed from a CUDA graph).
"""

from __future__ import annotations

import torch

from .osdn.chunk_scan import HAS_TRITON
from .osdn.launch import block_width, enqueue
from .step import few_rows_apply, plain_module, weights_apply

# Rows (tokens) up to which a step takes the kernel: each row's programs read all three weights,
# so many rows read them many times where one matrix product reads them once. On an H200 (bf16;
# benchmarks/results/gates51_af732ec.json) its GPU time against the ten kernels' at 1 / 64 / 256 /
# 1024 rows was 1.4 / 2.7 / 5.8 / 19.0 against 17.0 / 21.1 / 21.1 / 22.3 us at osdn-340m's layer
# (hidden 1024, 8 heads) and 1.6 / 4.6 / 13.3 / 47.8 against 21.1 / 24.1 / 25.1 / 27.3 us at
# osdn-1.3b's (2048, 16); wall time a call, calls queued back to back, 0.20-0.32 of theirs up to
# 1024 rows.
MAX_ROWS = 256

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_dot(x, w, i_n, i_h, D, BD: tl.constexpr):
        """`x_n . w_h` (row i_n of x, row i_h of w, both D long), summed in float32."""
        acc = tl.zeros([BD], dtype=tl.float32)
        for i_d in range(0, D, BD):
            o_d = i_d + tl.arange(0, BD)
            m = o_d < D
            xt = tl.load(x + i_n * D + o_d, mask=m, other=0.0).to(tl.float32)
            acc += xt * tl.load(w + i_h * D + o_d, mask=m, other=0.0).to(tl.float32)
        return tl.sum(acc, 0)

    @triton.jit
    def gates_step_kernel(
        x, wb, we, be, wa, ba, beta, eta, lam, D, H, eta_max,
        BD: tl.constexpr, PRECOND: tl.constexpr, APF: tl.constexpr,
    ):  # fmt: skip
        """One gate of one head of one row (token) a program (program ids: row, head, gate 0-2 for
        beta, eta, lam), so a step of a few tokens still spreads its weights' reads over many
        programs: the projection summed in float32, rounded to x's dtype as `nn.Linear` returns
        it (with its bias added before the rounding, as the product's epilogue adds it), then the
        float32 sigmoid; eta times `eta_max`. Without PRECOND eta is 0, without APF lam is 1
        (`OSDNAttention.gates`)."""
        i_n, i_h, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        dt = x.dtype.element_ty
        out = i_n * H + i_h
        if i_g == 0:
            a = _gate_dot(x, wb, i_n, i_h, D, BD)
            tl.store(beta + out, tl.sigmoid(a.to(dt).to(tl.float32)))
        elif i_g == 1:
            if PRECOND:
                a = _gate_dot(x, we, i_n, i_h, D, BD) + tl.load(be + i_h).to(tl.float32)
                tl.store(eta + out, eta_max * tl.sigmoid(a.to(dt).to(tl.float32)))
            else:
                tl.store(eta + out, 0.0)
        else:
            if APF:
                a = _gate_dot(x, wa, i_n, i_h, D, BD) + tl.load(ba + i_h).to(tl.float32)
                tl.store(lam + out, tl.sigmoid(a.to(dt).to(tl.float32)))
            else:
                tl.store(lam + out, 1.0)


def gates_step_applies(
    x: torch.Tensor, b_proj: torch.nn.Linear, eta_proj: torch.nn.Linear | None, apf_proj: torch.nn.Linear | None
) -> bool:
    """Whether `gates_step` takes these gates: Triton's device (CUDA, or its interpreter when
    forced), at most `MAX_ROWS` tokens, no autocast, each projection a plain `nn.Linear` without
    hooks (`plain_module`: a PEFT adapter or a hook stays with the modules), `b_proj` without a
    bias and the others with theirs (as `OSDNAttention` makes them), and x and every weight and
    bias in one 16- or 32-bit float dtype, contiguous, on x's device, plain tensors (float64, mixed
    dtypes and quantized or distributed weights stay in PyTorch)."""
    if not few_rows_apply(x, MAX_ROWS):
        return False
    if not all(plain_module(p, torch.nn.Linear) for p in (b_proj, eta_proj, apf_proj) if p is not None):
        return False
    if b_proj.bias is not None or any(p is not None and p.bias is None for p in (eta_proj, apf_proj)):
        return False
    return weights_apply(
        x, (t for p in (b_proj, eta_proj, apf_proj) if p is not None for t in (p.weight, p.bias) if t is not None)
    )


@torch.compiler.disable
def gates_step(
    x: torch.Tensor,
    b_proj: torch.nn.Linear,
    eta_proj: torch.nn.Linear | None,
    apf_proj: torch.nn.Linear | None,
    eta_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`beta, eta, lam` `[*x.shape[:-1], H]` in float32 from x `[..., hidden]`: `OSDNAttention.gates`
    in one kernel (eta 0 without `eta_proj`, lam 1 without `apf_proj`; `b_proj` has no bias, the
    other two have theirs). Call it only where `gates_step_applies`."""
    D = x.shape[-1]
    N, H = x.numel() // D, b_proj.weight.shape[0]
    beta, eta, lam = (torch.empty(*x.shape[:-1], H, dtype=torch.float32, device=x.device) for _ in range(3))
    we, be = (None, None) if eta_proj is None else (eta_proj.weight, eta_proj.bias)
    wa, ba = (None, None) if apf_proj is None else (apf_proj.weight, apf_proj.bias)
    enqueue(
        gates_step_kernel, (N, H, 3),
        x.contiguous(), b_proj.weight, we, be, wa, ba, beta, eta, lam, D, H, float(eta_max),
        BD=min(block_width(D), 1024), PRECOND=eta_proj is not None, APF=apf_proj is not None, num_warps=4,
    )  # fmt: skip
    return beta, eta, lam
