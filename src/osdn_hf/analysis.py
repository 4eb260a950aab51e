"""Memory diagnostics of trained OSDN layers (SPEC section 9)."""

from __future__ import annotations

import torch

from .ops.osdn.chunk import chunk_osdn
from .ops.osdn.fused_recurrent import precond_step
from .ops.osdn.utils import l2norm


@torch.no_grad()
def recall_residual(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Per layer, how well the memory holds what the layer wrote while reading `input_ids`.

    For each layer, from its own keys `k_i` (L2-normalised), values `v_i` and gates:

    * `recall_residual`: `mean_i ||S_T^T k_i - v_i||^2 / ||v_i||^2` over the pairs written,
      with `S_T` the memory after the whole sequence (lower is better);
    * `write_residual`: `mean_t |1 - beta_t <d_t, u_t>|`, the post-write over pre-write
      residual of the token just written (DeltaNet: `1 - beta_t`).

    Means run over heads and over the positions in `positions` (`[B, T]` bool; default every
    position `attention_mask` keeps). Padded positions are dropped before the layers run.

    Args:
        model: an `OSDNForCausalLM` or `OSDNModel`.
        input_ids: `[B, T]` token ids.
        attention_mask: `[B, T]` 0/1 padding mask.
        positions: `[B, T]` bool, the pairs to score (for MQAR: the key-value context).

    Returns:
        One dict per layer: `{"layer", "recall_residual", "write_residual"}`.
    """
    base = getattr(model, "model", model)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    score = keep if positions is None else keep & positions.bool()
    if not score.any():
        raise ValueError("`positions` and `attention_mask` leave no position to score")
    per_layer = [([], []) for _ in base.layers]
    # Rows run one at a time on their real tokens, so padding reaches neither the convolutions nor the state.
    for b in range(input_ids.shape[0]):
        ids = input_ids[b, keep[b]][None]  # (1, T_b)
        hidden = base(ids, output_hidden_states=True, use_cache=False).hidden_states
        for i, block in enumerate(base.layers):
            recall, write = _layer_residuals(block, hidden[i])
            per_layer[i][0].append(recall[0, score[b, keep[b]]])
            per_layer[i][1].append(write[0, score[b, keep[b]]])
    return [
        {"layer": i, "recall_residual": torch.cat(r).mean().item(), "write_residual": torch.cat(w).mean().item()}
        for i, (r, w) in enumerate(per_layer)
    ]


def _layer_residuals(block, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall residual `[B, T, H]` of every written pair against the final memory, and the
    realised write residual `[B, T, H]` of every token, for one `OSDNBlock`."""
    q, k, v, beta, eta, lam, _ = block.attn.project(block.attn_norm(hidden))
    k, v = l2norm(k).float(), v.float()
    _, S, _ = chunk_osdn(q.float(), k, v, beta, eta, lam, output_final_state=True)
    err = torch.einsum("bhkv,bthk->bthv", S, k) - v  # (B, T, H, V)
    recall = err.pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-12)  # (B, T, H)

    d = torch.ones_like(k[:, 0])  # (B, H, K)
    write = []
    for t in range(k.shape[1]):  # phase 1 of SPEC section 2, then the realised factor
        b = beta[:, t, :, None]
        d = precond_step(k[:, t], b, eta[:, t, :, None], lam[:, t, :, None], d)
        write.append((1 - b[..., 0] * (d * k[:, t] * k[:, t]).sum(-1)).abs())  # (B, H)
    return recall, torch.stack(write, dim=1)
