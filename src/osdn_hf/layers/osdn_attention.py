"""The OSDN token mixer (SPEC.md section 5)."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..ops.gates import gates_step, gates_step_applies
from ..ops.linear_step import linear_step, linear_step_applies, norm_linear_step, norm_linear_step_applies
from ..ops.osdn.chunk import chunk_osdn
from ..ops.osdn.fused_recurrent import fused_recurrent_osdn
from ..ops.osdn.utils import check_cu_seqlens
from ..ops.step import plain_module
from .modules import GatedRMSNorm, RMSNorm, ShortConvolution, pack_if_padded, short_conv_steps_in_place, unpack_padding

if TYPE_CHECKING:
    from ..configuration_osdn import OSDNConfig
    from ..modeling_osdn import OSDNCache

# With a cache, inputs up to this length take the token-by-token decoding op: below about
# one chunk (64 tokens) the chunked form does more work than the recurrence.
FUSED_RECURRENT_MAX_LEN = 64


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class OSDNAttention(nn.Module):
    """Online Scaled DeltaNet layer: DeltaNet whose write key is `d_t * k_t`.

    Shapes: input `[B, T, hidden]`; heads `H = num_heads`, head dims `K`, `V`.
    """

    def __init__(self, config: OSDNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_heads
        self.head_k_dim, self.head_v_dim = config.head_k_dim, config.head_v_dim
        key_dim, value_dim = H * self.head_k_dim, H * self.head_v_dim
        hidden = config.hidden_size
        self.use_precond = config.preconditioner == "osdn"
        self.use_apf = self.use_precond and config.use_apf
        self.eta_max = config.eta_max

        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden, H, bias=False)
        if self.use_precond:
            self.eta_proj = nn.Linear(hidden, H, bias=True)
            self.eta_proj.bias_init = _logit(config.precond_eta_init / config.eta_max)
        if self.use_apf:
            self.apf_proj = nn.Linear(hidden, H, bias=True)
            self.apf_proj.bias_init = _logit(config.apf_init)
        self.q_conv1d = ShortConvolution(key_dim, config.conv_size, bias=config.conv_bias)
        self.k_conv1d = ShortConvolution(key_dim, config.conv_size, bias=config.conv_bias)
        self.v_conv1d = ShortConvolution(value_dim, config.conv_size, bias=config.conv_bias)
        if config.use_output_gate:
            self.g_proj = nn.Linear(hidden, value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    def gates(self, x: torch.Tensor, step: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`beta, eta, lam`, each `[B, T, H]` in float32 (SPEC section 5, step 4). With `step` (a
        decoding step outside autograd), one Triton kernel computes all three where it applies
        (`ops.gates.gates_step`: CUDA, a few tokens), not ten small ones."""
        eta_proj = self.eta_proj if self.use_precond else None
        apf_proj = self.apf_proj if self.use_apf else None
        if step and not torch.is_grad_enabled() and gates_step_applies(x, self.b_proj, eta_proj, apf_proj):
            return gates_step(x, self.b_proj, eta_proj, apf_proj, self.eta_max)
        beta = self.b_proj(x).float().sigmoid()
        if self.use_precond:
            eta = self.eta_max * self.eta_proj(x).float().sigmoid()
        else:
            eta = torch.zeros_like(beta)
        lam = self.apf_proj(x).float().sigmoid() if self.use_apf else torch.ones_like(beta)
        return beta, eta, lam

    def project(
        self,
        x: torch.Tensor,
        conv_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inplace: bool = False,
    ):
        """SPEC section 5, steps 1, 2 and 4: the op's inputs from `x` `[B, T, hidden]`.

        Returns q, k `[B, T, H, K]` (not yet L2-normalised), v `[B, T, H, V]`, beta, eta, lam
        `[B, T, H]` and the new convolution states (q, k, v), written over `conv_state` with
        `inplace` (`ShortConvolution.forward`). A few rows without gradients project q, k and v in
        one kernel (`ops.linear_step`); a one-token step in place convolves them in one kernel
        (`short_conv_steps_in_place`) and takes the gates' kernel (`gates`' `step`).
        """
        caches = tuple(conv_state) if conv_state is not None else (None, None, None)
        convs, linears = (self.q_conv1d, self.k_conv1d, self.v_conv1d), (self.q_proj, self.k_proj, self.v_proj)
        xs = linear_step(x, linears) if linear_step_applies(x, linears) else [m(x) for m in linears]
        ys = short_conv_steps_in_place(convs, xs, caches) if inplace and cu_seqlens is None else None
        if ys is None:
            (q, conv_q), (k, conv_k), (v, conv_v) = (
                conv(xc, cache, cu_seqlens, inplace) for conv, xc, cache in zip(convs, xs, caches, strict=True)
            )
        else:  # one kernel for the three, the caches updated in place
            (q, k, v), (conv_q, conv_k, conv_v) = ys, caches
        q = q.view(*q.shape[:2], self.num_heads, self.head_k_dim)  # (B, T, H, K)
        k = k.view(*k.shape[:2], self.num_heads, self.head_k_dim)  # (B, T, H, K)
        v = v.view(*v.shape[:2], self.num_heads, self.head_v_dim)  # (B, T, H, V)
        beta, eta, lam = self.gates(x, step=inplace)
        return q, k, v, beta, eta, lam, (conv_q, conv_k, conv_v)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: OSDNCache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: `[B, T, hidden]`; attention_mask: `[B, T_total]` of 0/1 (its last T
        columns are this input's); cu_seqlens: packed sequences in a B = 1 input.

        Returns `[B, T, hidden]`, zero at masked positions.
        """
        B, T, _ = hidden_states.shape
        N = B if cu_seqlens is None else check_cu_seqlens(cu_seqlens, hidden_states, "hidden_states")
        state = past_key_values.get_layer_state(self.layer_idx) if past_key_values is not None else None
        if state is not None and state["recurrent_state"].shape[0] != N:
            raise ValueError(
                f"the cache holds the states of {state['recurrent_state'].shape[0]} sequences, but the input has {N}: "
                "pass the cache made for this batch, or none"
            )

        # 0. Masked positions neither read nor write the state: pack the real tokens. (OSDNModel
        # packs once for all its layers and passes `cu_seqlens` instead of a mask.)
        x, indices, cu_seqlens = pack_if_padded(hidden_states, attention_mask, cu_seqlens)  # (1, total, hidden)

        # Decoding without autograd updates the cached states in place (no new allocations; a
        # captured decoding step, `CUDAGraphDecoding`, relies on it).
        decoding = state is not None and T <= FUSED_RECURRENT_MAX_LEN
        inplace = decoding and use_cache and not torch.is_grad_enabled()

        # 1, 2, 4. Projections, short convolutions with SiLU, gates.
        conv_state = state["conv_state"] if state is not None else None
        q, k, v, beta, eta, lam, conv_state = self.project(x, conv_state, cu_seqlens, inplace)

        # 3 + 5. The op L2-normalises q and k (step 3) and runs the two-phase recurrence.
        S0 = state["recurrent_state"] if state is not None else None
        d0 = state["precond_state"] if state is not None else None
        if decoding:
            inplace = inplace and all(x.dtype == torch.float32 and x.is_contiguous() for x in (S0, d0))
            op = partial(fused_recurrent_osdn, inplace_final_state=inplace)
        else:
            op = chunk_osdn
        o, recurrent_state, precond_state = op(
            q,
            k,
            v,
            beta,
            eta,
            lam,
            initial_state=S0,
            initial_precond=d0,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
        )
        if use_cache:
            # Compiled, the cache keeps copies of its own: compiled code's outputs may live in memory
            # that its next call reuses (CUDA graphs, mode="reduce-overhead"; `OSDNCache`'s `_own_states`)
            own = torch.compiler.is_compiling()
            past_key_values.update_layer_state(self.layer_idx, recurrent_state, precond_state, conv_state, own=own)

        # 6. Per-head output norm (optionally gated), then the output projection; for a few rows
        # without gradients, the norm and the projection in one kernel (`ops.linear_step`).
        if isinstance(self.o_norm, GatedRMSNorm):
            g = self.g_proj(x).view(*x.shape[:2], self.num_heads, self.head_v_dim)  # (B, T, H, V)
            o = self.o_proj(self.o_norm(o, g).flatten(-2))
        elif plain_module(self.o_norm, RMSNorm) and norm_linear_step_applies(o, self.o_norm.weight, self.o_proj):
            o = norm_linear_step(o, self.o_norm.weight, self.o_norm.eps, self.o_proj)
        else:
            o = self.o_proj(self.o_norm(o).flatten(-2))  # (B, T, hidden)

        if indices is not None:
            o = unpack_padding(o, indices, B, T)
        return o
