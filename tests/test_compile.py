"""`torch.compile` of the model: training and decoding give what the model gives without it.

The Triton paths (the ops' kernels and the one-kernel decoding steps) run outside the compiled
graphs (`torch.compiler.disable`, as fla's ops do); the rest of the model, and the pure-PyTorch
path, compiles. Off the GPU the Triton paths run through Triton's interpreter (forced), on the GPU
on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from test_model import tiny_model
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import osdn_hf.modeling_osdn
from osdn_hf.modeling_osdn import _DECODE_GRAPHS, OSDNLayerCache, _own_states, output_cache
from osdn_hf.ops.osdn import utils

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKENDS = ["triton"] if ON_GPU else ["torch", "triton"]  # CUDA tensors always take the kernels


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A clean slate for Dynamo (its caches would otherwise outlive the test), and the path: the
    pure-PyTorch one, or the Triton kernels (interpreted where there is no GPU)."""
    if request.param == "triton":
        pytest.importorskip("triton", reason="Triton is not installed (it is a Linux-only dependency)")
        if not ON_GPU:
            monkeypatch.setenv(utils.FORCE_TRITON_ENV, "1")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def _padded_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 70 tokens (more than a chunk), the second left-padded by 9."""
    torch.manual_seed(seed)
    ids = torch.randint(1, 97, (2, 70))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _packed_batch(seed: int = 3) -> dict:
    """Three sequences of 30, 50 and 17 tokens packed in one row by transformers' padding-free
    collator (its restarting `position_ids` and `cu_seq_lens_q`)."""
    torch.manual_seed(seed)
    rows = [{"input_ids": torch.randint(1, 97, (n,)).tolist()} for n in (30, 50, 17)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


TRAINING_CASES = ["padded", "padded, checkpointing", "packed"] + (["padded, reduce-overhead"] if ON_GPU else [])


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_compiled_training_step_equals_eager(backend, case):
    model = tiny_model(num_hidden_layers=1).train().to(DEVICE)
    if "checkpointing" in case:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # (renamed in 5.24)
    if case == "packed":
        batch = _packed_batch()
    else:
        ids, mask = _padded_batch()
        batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def step(forward):
        model.zero_grad()
        out = forward(**batch)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, logits, grads = step(model)
    compiled = torch.compile(model, mode="reduce-overhead" if "reduce-overhead" in case else None)
    # the second call runs the compiled code as cached; with mode="reduce-overhead" the first warms
    # up, the second records the CUDA graphs and the third replays them
    for _ in range(3 if "reduce-overhead" in case else 2):
        c_loss, c_logits, c_grads = step(compiled)
        torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c_logits, logits, atol=1e-4, rtol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    assert torch.stack([g.abs().sum() for g in grads.values()]).min() > 0  # every parameter learns


# On a GPU, also with decoding steps replayed from CUDA graphs (off the GPU the option changes nothing),
# and compiled with mode="reduce-overhead" (torch's CUDA graphs of the compiled parts; CPU tensors skip them)
@pytest.mark.parametrize(
    "cuda_graphs, mode",
    [(False, None), (True, None), (False, "reduce-overhead"), (True, "reduce-overhead")] if ON_GPU else [(False, None)],
)
def test_compiled_forward_generates_like_eager(backend, cuda_graphs, mode):
    """`generate` with a compiled `forward` (as transformers compiles a model's): a prefill, then
    one-token steps that continue the cache, to the same tokens."""
    model = tiny_model(num_hidden_layers=1, cuda_graph_decoding=cuda_graphs).to(DEVICE)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kwargs)
    _DECODE_GRAPHS.pop(model, None)
    model.forward = torch.compile(model.forward, mode=mode)
    compiled = model.generate(ids, **kwargs)
    assert torch.equal(compiled, eager)
    assert eager.shape == (2, 76)
    assert (model in _DECODE_GRAPHS) == cuda_graphs  # the compiled steps were replayed from graphs


@pytest.fixture
def float32_settings():
    """On a GPU, `TrainingArguments(torch_compile=True)` turns TF32 on for the whole process
    (transformers' `enable_tf32`), which the kernels then follow (`dot_precision`); put torch's
    float32 settings back after the test, so that the tests after it run as they would alone."""
    levels = [torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn]
    saved = [(level, level.fp32_precision) for level in levels if hasattr(level, "fp32_precision")]
    legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    if saved:  # torch 2.9 and later
        for level, value in saved:
            level.fp32_precision = value
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


def test_trainer_torch_compile_trains_like_eager(backend, tmp_path, float32_settings):
    """`Trainer(torch_compile=True)`, as a user turns it on: the same losses as without it."""
    torch.manual_seed(4)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, 97, (8, 70)).tolist()]
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            torch_compile=compiled,
            use_cpu=not ON_GPU,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
        )
        trainer = Trainer(model=tiny_model(num_hidden_layers=1).train(), args=args, train_dataset=data)
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], atol=1e-4, rtol=1e-4)


def test_compiled_forward_keeps_the_caches_own_states(backend, monkeypatch):
    """Compiled, a layer hands its new states to `_own_states`, so the cache holds tensors of its own
    and not memory the compiled code may reuse (with mode="reduce-overhead" it does: CUDA graphs;
    `test_compiled_forward_generates_like_eager` runs that on a GPU); eagerly it keeps them as given."""
    calls = []

    @torch.compiler.disable
    def spy(layer, *states):
        calls.append(layer)
        return real(layer, *states)

    real = osdn_hf.modeling_osdn._own_states
    monkeypatch.setattr(osdn_hf.modeling_osdn, "_own_states", spy)
    model = tiny_model(num_hidden_layers=2).to(DEVICE)
    ids, mask = _padded_batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=True)
        assert calls == []
        compiled = torch.compile(model)(ids, attention_mask=mask, use_cache=True)
    assert len(calls) == 2  # one call a layer
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(output_cache(compiled).layers, output_cache(eager).layers):
        torch.testing.assert_close(a.recurrent_state, b.recurrent_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.precond_state, b.precond_state, atol=1e-4, rtol=1e-4)
        for x, y in zip(a.conv_state, b.conv_state, strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_own_states_copies_into_held_states_or_clones():
    layer = OSDNLayerCache()
    states = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4), (torch.randn(2, 8, 3),) * 3]
    first = _own_states(layer, *states)  # nothing held: clones
    assert all(a is not b and torch.equal(a, b) for a, b in zip(first[:2] + first[2], states[:2] + list(states[2])))
    layer.recurrent_state, layer.precond_state, layer.conv_state = first
    new = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4), tuple(torch.randn(2, 8, 3) for _ in range(3))]
    with torch.no_grad():
        second = _own_states(layer, *new)  # held ones of the same shape: written over
    for kept, held, given in zip(second[:2] + second[2], first[:2] + first[2], new[:2] + list(new[2])):
        assert kept is held and torch.equal(kept, given)
    # what the layer holds (updated in place) and what autograd needs stay as they are
    grad = torch.randn(2, 3, 4, 4, requires_grad=True)
    third = _own_states(layer, grad, layer.precond_state, layer.conv_state)
    assert third[0] is grad and third[1] is layer.precond_state and third[2][0] is layer.conv_state[0]
    # another batch size: cloned, the held states untouched
    fourth = _own_states(layer, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4), (torch.randn(1, 8, 3),) * 3)
    assert fourth[0].shape[0] == 1 and layer.recurrent_state.shape[0] == 2
