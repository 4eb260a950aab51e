"""Recurrent OSDN for decoding: one token at a time, the state carried between calls."""

from __future__ import annotations

import functools

import torch

from .chunk_scan import HAS_TRITON
from .launch import block_width, cdiv, enqueue
from .utils import check_inputs, run_padded, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def fused_recurrent_osdn_fwd_kernel(
        q,
        k,
        v,
        beta,
        eta,
        lam,
        s0,
        d0,
        o,
        sf,
        df,
        cu_seqlens,
        ticket,
        scale,
        T,
        H: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        USE_INITIAL_STATE: tl.constexpr,
        STORE_FINAL_STATE: tl.constexpr,
        IS_VARLEN: tl.constexpr,
        USE_QK_L2NORM: tl.constexpr,
        D_IN_PLACE: tl.constexpr = False,
    ):
        """SPEC section 2 token by token; one (sequence, head, V block) per program.

        The state tile S[:, V block] and the whole preconditioner d stay in registers for the
        whole sequence; every V block recomputes d (K values per token, cheaper than sharing).
        With D_IN_PLACE, `df` is `d0` and the head's V blocks share it: each counts itself done
        in `ticket` (one int32 a head, zero before and after the kernel), and the last one writes
        d, when every block of the head has read d0 and used it.
        """
        i_v, i_nh = tl.program_id(0), tl.program_id(1)
        i_n, i_h = i_nh // H, i_nh % H
        if IS_VARLEN:
            bos = tl.load(cu_seqlens + i_n).to(tl.int64)
            T = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
        else:
            bos = i_n.to(tl.int64) * T
        o_k = tl.arange(0, BK)
        m_k = o_k < K
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
        i_s = i_nh.to(tl.int64)
        if USE_INITIAL_STATE:
            b_s = tl.load(s0 + i_s * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)  # [BK, BV]
            b_d = tl.load(d0 + i_s * K + o_k, mask=m_k, other=1.0).to(tl.float32)  # [BK]
        else:
            b_s = tl.zeros([BK, BV], dtype=tl.float32)
            b_d = tl.full([BK], 1.0, dtype=tl.float32)
        p_q = q + (bos * H + i_h) * K + o_k
        p_k = k + (bos * H + i_h) * K + o_k
        p_v = v + (bos * H + i_h) * V + o_v
        p_o = o + (bos * H + i_h) * V + o_v
        p_g = bos * H + i_h
        for _ in range(0, T):
            b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            b_b = tl.load(beta + p_g).to(tl.float32)
            b_e = tl.load(eta + p_g).to(tl.float32)
            b_l = tl.load(lam + p_g).to(tl.float32)
            if USE_QK_L2NORM:
                b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
                b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
            # phase 1: hypergradient step on d, then APF
            b_u = b_k * b_k
            b_rho = 1 - b_b * tl.sum(b_d * b_u)
            b_d = b_l * (b_d + b_e * b_b * b_rho * b_u) + (1 - b_l)
            # phase 2: delta rule with the write key d * k
            b_err = b_v - tl.sum(b_k[:, None] * b_s, 0)  # [BV]
            b_s += (b_b * b_d * b_k)[:, None] * b_err[None, :]
            b_o = scale * tl.sum(b_q[:, None] * b_s, 0)  # [BV]
            tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
            p_q += H * K
            p_k += H * K
            p_v += H * V
            p_o += H * V
            p_g += H
        if STORE_FINAL_STATE:
            tl.store(sf + i_s * K * V + o_kv, b_s, mask=m_kv)
            if D_IN_PLACE:
                # acq_rel: the d0 reads of the blocks counted before come before this write
                if tl.atomic_add(ticket + i_s, 1, sem="acq_rel") == tl.num_programs(0) - 1:
                    tl.store(df + i_s * K + o_k, b_d, mask=m_k)
                    tl.store(ticket + i_s, 0)  # ready for the next call
            elif i_v == 0:
                tl.store(df + i_s * K + o_k, b_d, mask=m_k)


# The decoding kernel's V tile: 32 columns (head dims up to 256: at most 8192 state elements a
# program, 64 registers a thread at 4 warps). Narrower tiles spread a head's state over more SMs:
# on an H200 (B=1, H=16, K=V=128) a call took 2.4 us of GPU time at 16 or 32 columns, 2.9 at 64
# and 5.8 with all 128 in one program (benchmarks/results/decode_host3_9662b5b.json).
DECODE_BV = 32


def decode_tile(K: int, V: int) -> tuple[int, int, int, int]:
    """`(BK, BV, num_warps, NV)` of the decoding kernel for head dims K and V (NV: V blocks)."""
    return _decode_tile(K, V, DECODE_BV)


@functools.cache
def _decode_tile(K: int, V: int, widest: int) -> tuple[int, int, int, int]:
    BV = block_width(V, widest)
    return block_width(K), BV, 4, cdiv(V, BV)


_tickets: dict[tuple, torch.Tensor] = {}


def _ticket(x: torch.Tensor, n: int) -> torch.Tensor:
    """n int32 zeros for the kernel's in-place d (`D_IN_PLACE`) on x's device and current stream:
    kept between calls (the kernel leaves them zero), one buffer a stream, since calls on two
    streams may run at once."""
    # (the raw stream handle, as Triton's launch reads it: torch.cuda.current_stream builds a
    # Stream object on every call)
    key = (x.device, torch._C._cuda_getCurrentRawStream(x.get_device()) if x.is_cuda else 0)
    buf = _tickets.get(key)
    if buf is None or buf.numel() < n:
        buf = _tickets[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=x.device)
    return buf


def fused_recurrent_osdn_fwd(
    q,
    k,
    v,
    beta,
    eta,
    lam,
    scale,
    initial_state,
    initial_precond,
    output_final_state,
    cu_seqlens,
    use_qk_l2norm_in_kernel,
    N,
    inplace_final_state=False,
):
    """Launch the decoding kernel on `[B, T, H, *]` inputs (packed when `cu_seqlens` is given).

    With `inplace_final_state` the final `S` is written over `initial_state` (each program
    reads its own tile first and writes it last), and the final `d` over `initial_precond` by
    the last of a head's V blocks to finish (`D_IN_PLACE`; every block reads all of `d`).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK, BV, num_warps, NV = decode_tile(K, V)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    beta, eta, lam = beta.contiguous(), eta.contiguous(), lam.contiguous()
    o = torch.empty_like(v)
    if inplace_final_state:
        sf, df = initial_state, initial_precond
    elif output_final_state:
        sf, df = q.new_empty(N, H, K, V, dtype=torch.float32), q.new_empty(N, H, K, dtype=torch.float32)
    else:
        sf = df = None
    s0 = initial_state.float().contiguous() if initial_state is not None else None
    d0 = initial_precond.float().contiguous() if initial_precond is not None else None
    if (s0 is None) != (d0 is None):  # the kernel reads both or neither
        s0 = q.new_zeros(N, H, K, V, dtype=torch.float32) if s0 is None else s0
        d0 = q.new_ones(N, H, K, dtype=torch.float32) if d0 is None else d0
    shared = inplace_final_state and NV > 1
    enqueue(
        fused_recurrent_osdn_fwd_kernel, (NV, N * H),
        q, k, v, beta, eta, lam, s0, d0, o, sf, df, cu_seqlens, _ticket(q, N * H) if shared else None, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=s0 is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, USE_QK_L2NORM=use_qk_l2norm_in_kernel, D_IN_PLACE=shared,
        num_warps=num_warps,
    )  # fmt: skip
    return o, sf, df


class FusedRecurrentOSDNFunction(torch.autograd.Function):
    """Triton forward; the backward recomputes through the chunked op, which is differentiable."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        beta,
        eta,
        lam,
        initial_state,
        initial_precond,
        scale,
        output_final_state,
        cu_seqlens,
        use_qk_l2norm_in_kernel,
        N,
    ):
        ctx.save_for_backward(q, k, v, beta, eta, lam, initial_state, initial_precond)
        ctx.options = (scale, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)
        return fused_recurrent_osdn_fwd(
            q,
            k,
            v,
            beta,
            eta,
            lam,
            scale,
            initial_state,
            initial_precond,
            output_final_state,
            cu_seqlens,
            use_qk_l2norm_in_kernel,
            N,
        )

    @staticmethod
    def backward(ctx, do, dS, dd):
        from .chunk import chunk_osdn

        inputs = [x.detach().requires_grad_() if x is not None else None for x in ctx.saved_tensors]
        scale, output_final_state, cu_seqlens, l2norm = ctx.options
        q, k, v, beta, eta, lam, initial_state, initial_precond = inputs
        with torch.enable_grad():
            outs = chunk_osdn(
                q,
                k,
                v,
                beta,
                eta,
                lam,
                scale=scale,
                initial_state=initial_state,
                initial_precond=initial_precond,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=l2norm,
            )
        pairs = [(y, g) for y, g in zip(outs, (do, dS, dd)) if y is not None and g is not None]
        wanted = [x for x in inputs if x is not None]
        grads = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (*(next(grads) if x is not None else None for x in inputs), None, None, None, None, None)


def precond_step(k_t, b_t, e_t, l_t, d: torch.Tensor) -> torch.Tensor:
    """Phase 1 of SPEC section 2 for one token: k_t, d: [B, H, K]; b_t, e_t, l_t: [B, H, 1]."""
    u_t = k_t * k_t
    rho_t = 1 - b_t * (d * u_t).sum(-1, keepdim=True)
    return l_t * (d + e_t * b_t * rho_t * u_t) + (1 - l_t)


def osdn_step(q_t, k_t, v_t, b_t, e_t, l_t, scale: float, S: torch.Tensor, d: torch.Tensor):
    """One token of SPEC section 2 for a batch of heads.

    q_t, k_t: [B, H, K]; v_t: [B, H, V]; b_t, e_t, l_t: [B, H]; S: [B, H, K, V]; d: [B, H, K].
    Returns (o_t [B, H, V], S, d).
    """
    b_t, e_t, l_t = b_t[..., None], e_t[..., None], l_t[..., None]  # (B, H, 1)
    d = precond_step(k_t, b_t, e_t, l_t, d)
    err = v_t - (k_t[..., None] * S).sum(-2)  # (B, H, V)
    S = S + (b_t * d * k_t)[..., None] * err[..., None, :]
    o_t = scale * (q_t[..., None] * S).sum(-2)
    return o_t, S, d


def _fused_recurrent_osdn_torch(q, k, v, beta, eta, lam, scale, S, d):
    """float32 `[B, T, H, *]` in, `(o [B, T, H, V], S, d)` out."""
    o = torch.empty_like(v)
    for t in range(q.shape[1]):
        o_t, S, d = osdn_step(q[:, t], k[:, t], v[:, t], beta[:, t], eta[:, t], lam[:, t], scale, S, d)
        o[:, t] = o_t
    return o, S, d


@torch.compiler.disable
def _fused_recurrent_osdn_kernels(
    q, k, v, beta, eta, lam, scale, initial_state, initial_precond, output_final_state, cu_seqlens,
    use_qk_l2norm_in_kernel, inplace_final_state, needs_grad,
):  # fmt: skip
    """`fused_recurrent_osdn` on its Triton kernel. Under `torch.compile` it runs as it is, outside
    the graph, as `chunk_osdn`'s kernels do."""
    N = check_inputs(q, k, v, beta, eta, lam, scale, initial_state, initial_precond, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)  # one kernel for int and float scales
    if not needs_grad:
        # outside autograd (in place always is: checked above), so no Function is needed, nor
        # its bookkeeping on the host
        return fused_recurrent_osdn_fwd(
            q, k, v, beta, eta, lam, scale, initial_state, initial_precond, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, N, inplace_final_state=inplace_final_state,
        )  # fmt: skip
    return FusedRecurrentOSDNFunction.apply(
        q, k, v, beta, eta, lam, initial_state, initial_precond, scale, output_final_state, cu_seqlens,
        use_qk_l2norm_in_kernel, N,
    )  # fmt: skip


def fused_recurrent_osdn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    eta: torch.Tensor,
    lam: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    initial_precond: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    inplace_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Recurrent OSDN: the decoding path for one token or a short input.

    Same arguments and results as `chunk_osdn` (layout `[B, T, H, *]`, states `[N, H, K, V]`
    and `[N, H, K]` in float32); it walks the tokens one by one, so it is the cheaper path
    when T is small and the state comes from a cache.

    `inplace_final_state=True` writes the final states over `initial_state` and
    `initial_precond` (given, float32, contiguous, outside autograd) and returns those same
    tensors, so a decoding cache is updated without new allocations.

    Example:
        >>> B, H, K = 2, 4, 32
        >>> q, k, v = (torch.randn(B, 1, H, K) for _ in range(3))
        >>> beta, eta, lam = (torch.rand(B, 1, H) for _ in range(3))
        >>> S, d = torch.zeros(B, H, K, K), torch.ones(B, H, K)
        >>> o, S, d = fused_recurrent_osdn(q, k, v, beta, eta, lam, initial_state=S,
        ...                                initial_precond=d, output_final_state=True,
        ...                                use_qk_l2norm_in_kernel=True)
    """
    tracked = (q, k, v, beta, eta, lam, initial_state, initial_precond)
    # (a wrong argument type is reported by check_inputs, below)
    needs_grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tracked)
    if inplace_final_state:
        _check_inplace(initial_state, initial_precond, needs_grad)
        output_final_state = True
    if use_triton(q):
        return _fused_recurrent_osdn_kernels(
            q, k, v, beta, eta, lam, scale, initial_state, initial_precond, output_final_state, cu_seqlens,
            use_qk_l2norm_in_kernel, inplace_final_state, needs_grad,
        )  # fmt: skip
    o, S, d = run_padded(
        _fused_recurrent_osdn_torch,
        q,
        k,
        v,
        beta,
        eta,
        lam,
        scale,
        initial_state,
        initial_precond,
        output_final_state,
        cu_seqlens,
        use_qk_l2norm_in_kernel,
    )
    if inplace_final_state:
        return o, initial_state.copy_(S), initial_precond.copy_(d)
    return o, S, d


def _check_inplace(initial_state, initial_precond, needs_grad: bool) -> None:
    """`inplace_final_state` needs both states, float32 and contiguous, and no autograd through them."""
    for name, x in (("initial_state", initial_state), ("initial_precond", initial_precond)):
        if x is None:
            raise ValueError(f"`inplace_final_state=True` needs `{name}`: the final state is written into it")
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(
                f"`inplace_final_state=True` needs a contiguous float32 `{name}`, got {x.dtype}"
                f"{'' if x.is_contiguous() else ' (not contiguous)'}"
            )
    if needs_grad:
        raise ValueError(
            "`inplace_final_state=True` overwrites the initial states, which autograd would need: "
            "run it under torch.no_grad() or with inputs that do not require grad"
        )
