"""The causal LM loss, computed without a float32 copy of the logits.

transformers' default (`ForCausalLMLoss`) upcasts the `[B, T, vocab]` logits to float32 and
`cross_entropy` saves a float32 log-softmax of the same size for the backward: at 4 x 2048
tokens and a 32000-word vocabulary that is 2 GiB on top of the bf16 logits, the likely peak of
a training step of osdn-340m (README, model throughput). Here the logits are read in float32
one block of rows at a time (64 MiB); the forward saves only the per-row log-sum-exp, and the
backward writes the gradient in the logits' dtype, block by block. Same values as transformers'
loss (up to float32 rounding), same arguments (`ignore_index`, `shift_labels`,
`num_items_in_batch`).
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24  # logits upcast at a time: 64 MiB of float32 (524 rows of a 32000-word vocabulary)


class _RowCrossEntropy(torch.autograd.Function):
    """Per-row cross entropy `logsumexp(x) - x[target]` of `[N, V]` logits (0 where the target is
    ignored), computed in float32 in blocks of rows of `BLOCK_ELEMENTS` logits."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        valid = target != ignore_index
        target = torch.where(valid, target, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        n = _rows(logits)
        for i in range(0, logits.shape[0], n):
            lse[i : i + n] = torch.logsumexp(logits[i : i + n].float(), dim=-1)
        picked = logits.gather(1, target[:, None])[:, 0].float()
        ctx.save_for_backward(logits, target, valid, lse)
        return torch.where(valid, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, target, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad, 0.0)
        out = torch.empty_like(logits)
        n = _rows(logits)
        for i in range(0, logits.shape[0], n):
            rows = slice(i, i + n)
            # softmax of one block, in one new float32 tensor (a copy even of float32 logits:
            # they are the model's output too, never written in place)
            g = logits[rows].to(torch.float32, copy=True).sub_(lse[rows, None]).exp_()
            g.scatter_add_(1, target[rows, None], torch.full_like(g[:, :1], -1.0))
            out[rows] = g.mul_(scale[rows, None])
        return out, None, None


def _rows(logits: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // logits.shape[-1])


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Next-token cross entropy, as transformers' `ForCausalLMLoss`: `labels` `[B, T]` are shifted
    inside (or `shift_labels` given already shifted), positions labelled `ignore_index` are left
    out, and the sum is divided by `num_items_in_batch` when given (what `Trainer` passes under
    gradient accumulation), else by the number of positions counted.

    Example:
        >>> logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        >>> float(causal_lm_loss(logits, labels, vocab_size=11)) > 0
        True
    """
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits' last dimension is {logits.shape[-1]}, the vocabulary has {vocab_size} entries")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(shift_labels.shape)} do not match logits of shape {tuple(logits.shape)}"
        )
    target = shift_labels.reshape(-1).to(logits.device)
    losses = _RowCrossEntropy.apply(logits.reshape(-1, vocab_size), target, ignore_index)
    if num_items_in_batch is None:
        return losses.sum() / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch
