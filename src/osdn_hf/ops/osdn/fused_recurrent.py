"""Recurrent OSDN for decoding: one token at a time, the state carried between calls."""

from __future__ import annotations

import torch

from .utils import run_padded


def osdn_step(q_t, k_t, v_t, b_t, e_t, l_t, scale: float, S: torch.Tensor, d: torch.Tensor):
    """One token of SPEC section 2 for a batch of heads.

    q_t, k_t: [B, H, K]; v_t: [B, H, V]; b_t, e_t, l_t: [B, H]; S: [B, H, K, V]; d: [B, H, K].
    Returns (o_t [B, H, V], S, d).
    """
    b_t, e_t, l_t = b_t[..., None], e_t[..., None], l_t[..., None]  # (B, H, 1)
    u_t = k_t * k_t
    rho_t = 1 - b_t * (d * u_t).sum(-1, keepdim=True)
    d = l_t * (d + e_t * b_t * rho_t * u_t) + (1 - l_t)
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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Recurrent OSDN: the decoding path for one token or a short input.

    Same arguments and results as `chunk_osdn` (layout `[B, T, H, *]`, states `[N, H, K, V]`
    and `[N, H, K]` in float32); it walks the tokens one by one, so it is the cheaper path
    when T is small and the state comes from a cache.

    Example:
        >>> B, H, K = 2, 4, 32
        >>> q, k, v = (torch.randn(B, 1, H, K) for _ in range(3))
        >>> beta, eta, lam = (torch.rand(B, 1, H) for _ in range(3))
        >>> S, d = torch.zeros(B, H, K, K), torch.ones(B, H, K)
        >>> o, S, d = fused_recurrent_osdn(q, k, v, beta, eta, lam, initial_state=S,
        ...                                initial_precond=d, output_final_state=True,
        ...                                use_qk_l2norm_in_kernel=True)
    """
    # TODO(issue 3): dispatch CUDA tensors to the Triton decoding kernel here.
    return run_padded(
        _fused_recurrent_osdn_torch, q, k, v, beta, eta, lam, scale, initial_state, initial_precond,
        output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
    )
