"""Chunkwise OSDN (SPEC section 3): the training and prefill path.

Two phases, each over chunks of `CHUNK_SIZE` tokens:

1. `chunk_precondition` runs the preconditioner recurrence (SPEC section 2, phase 1) as a
   gated delta rule on a `K`-vector and returns the write keys `W = D * K`. It never reads
   `S`, and phase 2 only sees `W`, so another preconditioner can replace it.
2. `chunk_delta_rule_asym` runs the asymmetric delta rule with read key `K` and write key
   `W` through the WY form of SPEC section 3.

Here both phases are batched torch algebra over all chunks except one recurrence each from
chunk to chunk (the torch loops of `chunk_scan.py`), differentiated by autograd: the path off
CUDA. On CUDA (`utils.use_triton` decides, once) `chunk_fused.py` runs the same algebra as
Triton kernels with hand-written backward. The derivation is in `README.md`.
"""

from __future__ import annotations

from functools import partial

import torch

from .chunk_fused import GatesToChunks, ToChunks, chunk_osdn_fused
from .chunk_precond import LAM_MIN
from .chunk_scan import precond_scan_torch, state_scan_torch
from .utils import dot_precision, l2norm, run_padded, use_triton

# 64 matches the Triton kernels' tile and fla's chunk size; on CPU any size gives the same
# result, larger chunks trade more C x C work for fewer sequential steps.
CHUNK_SIZE = 64

# lam = 0 exactly (a full APF reset) would give log(0) = -inf and NaN differences; lam is
# clamped at LAM_MIN (1e-30, shared with the kernels), which changes the result by at most a
# factor (1 + 1e-30).


def _to_chunks(x: torch.Tensor, C: int, fill: float = 0.0) -> torch.Tensor:
    """[B, T, H, *] -> float32 [B, H, NC, C, *], padding T at the end to a multiple of C with `fill`.

    One copy that casts and permutes together (the kernels read the result contiguously).
    """
    B, T, H = x.shape[:3]
    NC = max(-(-T // C), 1)
    out = x.new_empty((B, H, NC, C, *x.shape[3:]), dtype=torch.float32)
    rows = out.movedim(1, 3).flatten(1, 2)  # a [B, NC * C, H, *] view of `out`
    if NC * C > T:
        rows[:, T:].fill_(fill)
    rows[:, :T].copy_(x)
    return out


def _from_chunks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, NC, C, D] -> [B, T, H, D] in `dtype`, in one copy."""
    B, H, NC, C, D = x.shape
    return x.new_empty(B, T, H, D, dtype=dtype).copy_(x.movedim(1, 3).flatten(1, 2)[:, :T])


def _solve_unit_lower(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve (I + A) X = rhs, A strictly lower triangular [..., C, C]."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)


def chunk_precondition(
    k: torch.Tensor, beta: torch.Tensor, eta: torch.Tensor, lam: torch.Tensor, d0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: the preconditioner `d_t` at every position, chunk by chunk.

    With `e_t = d_t - 1`, SPEC section 2 reads
    `e_t = lam_t [ e_{t-1} + u_t (m_t - a_t <u_t, e_{t-1}>) ]`, where `u_t = k_t * k_t`,
    `a_t = eta_t beta_t^2` and `m_t = eta_t beta_t (1 - beta_t sum(u_t))`. Inside a chunk the
    scalars `delta_t = m_t - a_t <u_t, e_{t-1}>` solve a unit lower-triangular system, and
    `e_t` follows from them in closed form (README.md, "Phase 1"). Only the chunk-start
    values `e_n` need a sequential scan.

    Args:
        k: `[B, H, NC, C, K]` keys; beta, eta, lam: `[B, H, NC, C]`; d0: `[B, H, K]`.

    Returns:
        `d` `[B, H, NC, C, K]` at every position and the final `d` `[B, H, K]`.
    """
    C = k.shape[-2]
    u = k * k  # (B, H, NC, C, K)
    a = eta * beta * beta  # (B, H, NC, C)
    m = eta * beta * (1 - beta * u.sum(-1))  # (B, H, NC, C)
    log_lam = torch.log(lam.clamp_min(LAM_MIN))
    g = log_lam.cumsum(-1)  # log G_t, inclusive
    gp = g - log_lam  # log G_{t-1}, exclusive
    strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    neg_inf = torch.tensor(float("-inf"), device=k.device)
    # L[t, s] = a_t G_{t-1} / G_{s-1} <u_t, u_s>, s < t
    L = (
        a[..., None]
        * torch.exp(torch.where(strict, gp[..., :, None] - gp[..., None, :], neg_inf))
        * (u @ u.transpose(-1, -2))
    )
    # P[t, s] = G_t / G_{s-1}, s <= t
    P = torch.exp(torch.where(incl, g[..., :, None] - gp[..., None, :], neg_inf))  # (B, H, NC, C, C)
    rhs = torch.cat([m[..., None], (a * torch.exp(gp))[..., None] * u], dim=-1)  # (B, H, NC, C, 1 + K)
    sol = _solve_unit_lower(L, rhs)
    delta_m, Y = sol[..., 0], sol[..., 1:]  # (B, H, NC, C), (B, H, NC, C, K)

    # The chunk-end value is the last row of E below: e_{n+1} = Gc e_n + U^T (p * delta).
    es, d = precond_scan_torch(Y, u, delta_m, P[..., -1, :], torch.exp(g[..., -1]), d0)  # d = 1 + e_NC
    delta = delta_m - (Y @ es[..., None])[..., 0]  # (B, H, NC, C)
    E = torch.exp(g)[..., None] * es[..., None, :] + P @ (delta[..., None] * u)  # (B, H, NC, C, K)
    return 1 + E, d


def chunk_delta_rule_asym(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    S0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2: `S_t = S_{t-1} + beta_t w_t (v_t - S_{t-1}^T k_t)^T`, `o_t = scale S_t^T q_t`.

    SPEC section 3, per chunk: `A = I + tril(diag(b) K W^T, -1)`,
    `U = A^{-1} diag(b) (V - K S_0)`, `O = scale (Q S_0 + tril(Q W^T) U)`, `S_C = S_0 + W^T U`.
    Everything but the chunk-to-chunk state recurrence runs for all chunks at once.

    Args:
        q, k, w: `[B, H, NC, C, K]`; v: `[B, H, NC, C, V]`; beta: `[B, H, NC, C]`; S0: `[B, H, K, V]`.

    Returns:
        `o` `[B, H, NC, C, V]` and the final state `[B, H, K, V]`.
    """
    C = q.shape[-2]
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = (beta[..., None] * (k @ w.transpose(-1, -2))).masked_fill(~strict, 0)  # (B, H, NC, C, C)
    # One solve gives both parts of U = A^{-1} diag(b) V - A^{-1} diag(b) K S_0.
    sol = _solve_unit_lower(A, beta[..., None] * torch.cat([v, k], dim=-1))
    Ub, Kb = sol[..., : v.shape[-1]], sol[..., v.shape[-1] :]  # (B, H, NC, C, V), (B, H, NC, C, K)
    U, S_starts, S = state_scan_torch(Kb, w, Ub, S0)
    Mqw = (q @ w.transpose(-1, -2)).masked_fill(~incl, 0)  # (B, H, NC, C, C)
    return scale * (q @ S_starts + Mqw @ U), S


@torch.compiler.disable
def _chunk_osdn_kernels(q, k, v, beta, eta, lam, scale, S0, d0, precision, l2norm_qk, chunk_size):
    """`_chunk_osdn_core` on the Triton kernels. Under `torch.compile` it runs as it is, outside the
    graph, as fla's ops do; Dynamo would otherwise trace into the launches (under Triton's
    interpreter that fails: `tests/test_compile.py`). `precision` None reads torch's float32 setting
    (`dot_precision`) here, where Dynamo does not trace it."""
    if precision is None:
        precision = dot_precision(q)
    # q, k, v and the kernels' [B, H, NC, C, *] intermediates (per-chunk states included) are
    # stored in the inputs' dtype when it is 16-bit, as fla does, and in float32 otherwise;
    # products run in 16 bits where both operands are stored ones (chunk_fused.py), and the
    # states are carried from chunk to chunk in float32
    # v and o stay [B, T, H, V] (the kernels address their rows there)
    sd = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    qc, kc = (ToChunks.apply(x, chunk_size, l2norm_qk, sd) for x in (q, k))
    bc, ec, lc = GatesToChunks.apply(beta, eta, lam, chunk_size)
    return chunk_osdn_fused(qc, kc, v.to(sd), bc, ec, lc, scale, S0, d0, precision, q.dtype, l2norm_qk)


def _chunk_osdn_core(
    q, k, v, beta, eta, lam, scale, S0, d0, use_triton=False, precision="ieee", l2norm_qk=False, chunk_size=CHUNK_SIZE
):
    """`[B, T, H, *]` in (any float dtype; the states float32), `(o [B, T, H, V]` in
    q's dtype, `S [B, H, K, V], d [B, H, K])` out. With `l2norm_qk` q and k are L2-normalised
    first: on the Triton path inside the kernels that relayout them. `precision` is the kernels'
    (None: from torch's float32 setting); the torch path ignores it."""
    T = q.shape[1]
    if use_triton:
        return _chunk_osdn_kernels(q, k, v, beta, eta, lam, scale, S0, d0, precision, l2norm_qk, chunk_size)
    bc, ec = _to_chunks(beta, chunk_size), _to_chunks(eta, chunk_size)
    lc = _to_chunks(lam, chunk_size, fill=1.0)
    if l2norm_qk:
        q, k = l2norm(q), l2norm(k)
    qc, kc, vc = (_to_chunks(x, chunk_size) for x in (q, k, v))
    D, d = chunk_precondition(kc, bc, ec, lc, d0)
    o, S = chunk_delta_rule_asym(qc, kc, D * kc, vc, bc, scale, S0)
    return _from_chunks(o, T, q.dtype), S, d


def chunk_osdn(
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
    """Chunkwise OSDN: the training and prefill path.

    Args:
        q, k: `[B, T, H, K]` queries and keys (the layer L2-normalises keys).
        v: `[B, T, H, V]` values.
        beta, eta, lam: `[B, T, H]` write strength, preconditioner step, APF retention, in (0, 1).
        scale: output scale, defaults to `K ** -0.5`.
        initial_state: `[N, H, K, V]` memory `S_0` (zeros if None).
        initial_precond: `[N, H, K]` preconditioner `d_0` (ones if None).
        output_final_state: return the final `S` and `d` (float32).
        cu_seqlens: int64 `[N + 1]` offsets of packed sequences (B must be 1); states reset
            at each boundary.
        use_qk_l2norm_in_kernel: L2-normalise q and k inside the op.

    Returns:
        `o` `[B, T, H, V]` in the dtype of `q`; `final_state` `[N, H, K, V]` and
        `final_precond` `[N, H, K]` in float32, or None unless `output_final_state`.

    Example:
        >>> B, T, H, K = 2, 100, 4, 32
        >>> q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> beta, eta, lam = (torch.rand(B, T, H) for _ in range(3))
        >>> o, S, d = chunk_osdn(q, k, v, beta, eta, lam, output_final_state=True)
        >>> o.shape, S.shape, d.shape
        (torch.Size([2, 100, 4, 32]), torch.Size([2, 4, 32, 32]), torch.Size([2, 4, 32]))
    """
    kernels = use_triton(q)
    # precision None: the kernels read torch's float32 setting themselves (`_chunk_osdn_kernels`)
    core = partial(_chunk_osdn_core, use_triton=kernels, precision=None, l2norm_qk=use_qk_l2norm_in_kernel)
    return run_padded(
        core,
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
        False,  # the core normalises q and k (l2norm_qk)
        cast_inputs=False,
        default_states=not kernels,  # the kernels start from S_0 = 0, d_0 = 1 when given None
    )
