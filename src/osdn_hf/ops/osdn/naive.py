"""The OSDN token loop of SPEC section 2, in float32: the ground truth for every fast path."""

from __future__ import annotations

import torch

from .utils import check_inputs, l2norm


def _osdn_loop(q, k, v, beta, eta, lam, scale, S, d):
    """One sequence batch, float32 throughout.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta, eta, lam: [B, T, H];
    S: [B, H, K, V]; d: [B, H, K]. Returns o [B, T, H, V], S, d.
    """
    B, T, H, _ = q.shape
    o = [q.new_zeros(B, 0, H, v.shape[-1])]  # keeps T = 0 well defined
    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # (B, H, K), (B, H, K), (B, H, V)
        b_t, e_t, l_t = beta[:, t, :, None], eta[:, t, :, None], lam[:, t, :, None]  # (B, H, 1)
        # Phase 1: hypergradient step on the preconditioner, then APF.
        u_t = k_t * k_t
        rho_t = 1 - b_t * (d * u_t).sum(-1, keepdim=True)
        d = l_t * (d + e_t * b_t * rho_t * u_t) + (1 - l_t)
        # Phase 2: asymmetric delta rule with the write key w = d * k.
        w_t = d * k_t
        err = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)  # (B, H, V)
        S = S + b_t[..., None] * w_t[..., :, None] * err[..., None, :]
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, S)[:, None])
    return torch.cat(o, dim=1), S, d


def naive_recurrent_osdn(
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """OSDN as a plain float32 token loop (SPEC section 2). Slow; differentiable by autograd.

    Args:
        q, k: `[B, T, H, K]` queries and keys.
        v: `[B, T, H, V]` values.
        beta, eta, lam: `[B, T, H]` write strength, preconditioner step and APF retention.
        scale: output scale, defaults to `K ** -0.5`.
        initial_state: `[N, H, K, V]` memory `S_0` (zeros if None).
        initial_precond: `[N, H, K]` preconditioner `d_0` (ones if None).
        output_final_state: return the final `S` and `d` (float32).
        cu_seqlens: int64 `[N + 1]` offsets of packed sequences (B must be 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k inside the op.

    Returns:
        `o` `[B, T, H, V]` in the dtype of `q`, `final_state` `[N, H, K, V]` and
        `final_precond` `[N, H, K]` (float32, or None unless `output_final_state`).
    """
    N = check_inputs(q, k, v, beta, eta, lam, scale, initial_state, initial_precond, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype = q.dtype
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, beta, eta, lam = (x.float() for x in (q, k, v, beta, eta, lam))
    S0 = q.new_zeros(N, H, K, V) if initial_state is None else initial_state.float()
    d0 = q.new_ones(N, H, K) if initial_precond is None else initial_precond.float()

    if cu_seqlens is None:
        o, S, d = _osdn_loop(q, k, v, beta, eta, lam, scale, S0, d0)
    else:
        # Each packed sequence runs alone, from its own initial state.
        outs, states, preconds = [], [], []
        bounds = cu_seqlens.tolist()
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = (x[:, start:end] for x in (q, k, v, beta, eta, lam))
            o_n, S_n, d_n = _osdn_loop(*seg, scale, S0[n : n + 1], d0[n : n + 1])
            outs.append(o_n)
            states.append(S_n)
            preconds.append(d_n)
        o, S, d = torch.cat(outs, dim=1), torch.cat(states), torch.cat(preconds)

    if not output_final_state:
        S = d = None
    return o.to(dtype), S, d
