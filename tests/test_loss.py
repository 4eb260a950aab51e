"""The causal LM loss: transformers' values and gradients without its float32 copies of the logits."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from osdn_hf.layers import loss as loss_module
from osdn_hf.layers.loss import causal_lm_loss

V = 37


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 11, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (3, 11), generator=g)
    labels[0, :4] = -100  # left out of the loss
    labels[2, 7] = -100
    return logits, labels


def _value_and_grad(fn, logits, **kwargs):
    x = logits.clone().requires_grad_()
    loss = fn(x, **kwargs)
    (grad,) = torch.autograd.grad(loss * 1.7, x)
    return loss, grad


@pytest.mark.parametrize("rows", [4096, 5])  # one block, and blocks of 5 rows with a remainder
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(19)}, {"num_items_in_batch": 7}, {"shift_labels": "given"}],
    ids=["mean", "num_items_tensor", "num_items_int", "shift_labels"],
)
def test_equals_transformers_loss_in_float32(kwargs, rows, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", rows * V)
    logits, labels = _batch(torch.float32)
    if kwargs.get("shift_labels") == "given":
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        kwargs = {"shift_labels": torch.where(shifted % 3 == 0, -100, shifted)}
    ref, ref_grad = _value_and_grad(ForCausalLMLoss, logits, labels=labels, vocab_size=V, **kwargs)
    got, got_grad = _value_and_grad(causal_lm_loss, logits, labels=labels, vocab_size=V, **kwargs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert got_grad[0, :3].abs().sum() == 0  # positions whose next token is ignored get no gradient


def test_bf16_logits_match_and_keep_no_float32_copy(monkeypatch):
    """bf16 logits: the loss is computed in float32 (transformers' value within float32 rounding),
    the gradient comes back in bf16, and autograd keeps no float32 tensor of the logits' size,
    as transformers' loss does (twice: the upcast and the log-softmax)."""
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 8 * V)
    logits, labels = _batch(torch.bfloat16)

    def saved_float32_logits(fn):
        saved = []
        x = logits.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = fn(x, labels=labels, vocab_size=V)
        big = [t for t in saved if t.dtype == torch.float32 and t.numel() == logits.numel()]
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad, big

    ref, ref_grad, ref_big = saved_float32_logits(ForCausalLMLoss)
    got, got_grad, got_big = saved_float32_logits(causal_lm_loss)
    assert len(ref_big) >= 1 and got_big == []
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_leaves_the_logits_as_they_were(dtype, monkeypatch):
    """The logits are the model's output too: the loss's backward must not write into them (for
    float32 logits, `.float()` returns the logits themselves)."""
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 8 * V)
    logits, labels = _batch(dtype)
    x = logits.clone().requires_grad_()
    causal_lm_loss(x, labels, vocab_size=V).backward()
    assert torch.equal(x.detach(), logits)


def test_all_positions_ignored_gives_nan_as_transformers():
    logits, labels = _batch(torch.float32)
    labels[:] = -100
    assert torch.isnan(causal_lm_loss(logits, labels, vocab_size=V))
    assert torch.isnan(ForCausalLMLoss(logits, labels, vocab_size=V))


def test_mismatched_shapes_raise_value_error():
    logits, labels = _batch(torch.float32)
    with pytest.raises(ValueError, match="vocabulary has 40"):
        causal_lm_loss(logits, labels, vocab_size=40)
    with pytest.raises(ValueError, match="do not match logits"):
        causal_lm_loss(logits[:, -2:], labels, vocab_size=V)
