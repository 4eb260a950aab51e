"""Layer and model: padding, packing, cached decoding, generation, config validation, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DataCollatorWithFlattening

from osdn_hf import OSDNCache, OSDNConfig, OSDNForCausalLM, OSDNModel
from osdn_hf.layers.modules import ShortConvolution
from osdn_hf.modeling_osdn import CACHE_FIELD, output_cache
from osdn_hf.ops.osdn import utils

REPO = Path(__file__).resolve().parents[1]
# SPEC section 7: cached decoding equals one full forward within float32 1e-4.
LOGITS_ATOL = 1e-4


def tiny_config(**overrides) -> OSDNConfig:
    kwargs = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, pad_token_id=0)
    kwargs.update(overrides)
    return OSDNConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> OSDNForCausalLM:
    torch.manual_seed(seed)
    model = OSDNForCausalLM(tiny_config(**overrides)).eval()
    # Trained-like gates: random biases so beta, eta and lam vary per head and token.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("eta_proj", "apf_proj"):
                if hasattr(layer.attn, proj):
                    getattr(layer.attn, proj).weight.normal_(0, 0.3)
            layer.attn.b_proj.weight.normal_(0, 0.3)
    return model


def test_auto_classes_are_registered():
    config = AutoConfig.for_model("osdn", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2)
    assert isinstance(config, OSDNConfig)
    assert isinstance(AutoModel.from_config(config), OSDNModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), OSDNForCausalLM)


@pytest.mark.parametrize("preconditioner", ["osdn", "none"])
@pytest.mark.parametrize("prefill", [1, 7, 70])
def test_cached_decoding_equals_full_forward(prefill, preconditioner):
    """Prefill (chunked op when > 64 tokens, recurrent otherwise), then token by token."""
    model = tiny_model(preconditioner=preconditioner)
    ids = torch.randint(1, 97, (3, prefill + 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        assert isinstance(cache, OSDNCache) and cache.get_seq_length() == prefill
        prefilled = cache.get_layer_state(0)
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=LOGITS_ATOL, rtol=0)
    state = cache.get_layer_state(0)
    # decoding without autograd updated the prefill's state tensors in place
    assert state["recurrent_state"] is prefilled["recurrent_state"]
    assert state["precond_state"] is prefilled["precond_state"]
    assert all(a is b for a, b in zip(state["conv_state"], prefilled["conv_state"], strict=True))
    assert state["recurrent_state"].shape == (3, 2, 16, 16) and state["recurrent_state"].dtype == torch.float32
    assert state["precond_state"].shape == (3, 2, 16)
    assert [c.shape for c in state["conv_state"]] == [(3, 32, 3)] * 3


def test_left_padding_equals_unpadded_runs():
    model = tiny_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (9, 4, 1)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits
            torch.testing.assert_close(padded[i, width - len(p) :], alone[0], atol=LOGITS_ATOL, rtol=0)


def test_model_packs_padding_once_for_all_layers(monkeypatch):
    """The model drops a mask of ones and packs a padded batch once: every layer gets the same
    `cu_seqlens` tensor and no mask (each layer used to ask the GPU whether the mask pads, and
    pack again). Real tokens get the unpadded logits; padding comes out as zeros."""
    model = tiny_model()
    seen = []
    for layer in model.model.layers:
        layer.attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw.get("attention_mask"), kw.get("cu_seqlens"), a[0].shape)),
            with_kwargs=True,
        )
    host_copies, original = [], utils._Varlen.__init__
    monkeypatch.setattr(utils._Varlen, "__init__", lambda self, cu: host_copies.append(cu) or original(self, cu))
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
        assert seen == [(None, None, (2, 6, 32))] * 4
        seen.clear()
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(seen) == 2 and all(m is None and shape == (1, 10, 32) for m, _, shape in seen)
    assert seen[0][1] is seen[1][1] and seen[0][1].tolist() == [0, 6, 10]
    assert len(host_copies) == 1  # three convolutions and the op in each of two layers: one copy
    torch.testing.assert_close(ones, plain, atol=0, rtol=0)
    torch.testing.assert_close(out.logits[0], plain[0], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.logits[1, 2:], model(ids[1:, 2:]).logits[0], atol=LOGITS_ATOL, rtol=0)
    assert len(out.hidden_states) == 3 and not out.logits[1, :2].any()
    for h in out.hidden_states:
        assert h.shape == (2, 6, 32) and not h[1, :2].any() and h[1, 2:].abs().sum(-1).min() > 0
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids[:1], attention_mask=mask[1:], cu_seqlens=torch.tensor([0, 3, 6]))


def test_padding_does_not_write_state():
    """Pads anywhere (not only on the left) neither read nor write the recurrent state."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 3:6] = 0
    with torch.no_grad():
        holes = model(ids, attention_mask=mask, use_cache=True)
        real = ids[:, mask[0].bool()]
        dense = model(real, use_cache=True)
    torch.testing.assert_close(holes.logits[:, mask[0].bool()], dense.logits, atol=LOGITS_ATOL, rtol=0)
    for layer in range(2):
        a, b = holes.past_key_values.get_layer_state(layer), dense.past_key_values.get_layer_state(layer)
        torch.testing.assert_close(a["recurrent_state"], b["recurrent_state"])
        torch.testing.assert_close(a["precond_state"], b["precond_state"])


def test_packed_cu_seqlens_equal_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(1, 97, (1, 13)), torch.randint(1, 97, (1, 70))
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 13, 83])).logits
        torch.testing.assert_close(packed[:, :13], model(a).logits, atol=LOGITS_ATOL, rtol=0)
        torch.testing.assert_close(packed[:, 13:], model(b).logits, atol=LOGITS_ATOL, rtol=0)


def test_packed_labels_do_not_cross_sequences():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 20))
    cu = torch.tensor([0, 8, 20])
    loss = model(ids, labels=ids, cu_seqlens=cu).loss
    logits = model(ids, cu_seqlens=cu).logits
    targets = torch.cat([ids[0, 1:8], ids[0, 9:20]])
    expected = torch.nn.functional.cross_entropy(torch.cat([logits[0, :7], logits[0, 8:19]]), targets)
    torch.testing.assert_close(loss, expected)


def test_generate_greedy_sampling_and_beam_search():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 6))
    mask = torch.ones_like(ids)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(greedy, no_cache)
    # Greedy decoding by hand, one full forward per token.
    seq = ids
    for _ in range(8):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(greedy, seq)

    torch.manual_seed(1)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(1)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (2, 14) and torch.equal(sampled, again)

    beams = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    beams_no_cache = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False, pad_token_id=0
    )
    assert torch.equal(beams, beams_no_cache)


def test_decoding_with_autograd_makes_new_states():
    """With autograd on, a decoding step leaves the states it read as they were (autograd may
    need them) and returns new ones."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).past_key_values
    before = {k: v if k != "conv_state" else tuple(v) for k, v in cache.get_layer_state(0).items()}
    saved = {k: v.clone() if k != "conv_state" else tuple(c.clone() for c in v) for k, v in before.items()}
    model(ids[:, 4:], past_key_values=cache, use_cache=True)
    after = cache.get_layer_state(0)
    assert after["recurrent_state"] is not before["recurrent_state"]
    assert all(a is not b for a, b in zip(after["conv_state"], before["conv_state"]))
    torch.testing.assert_close(before["recurrent_state"], saved["recurrent_state"], rtol=0, atol=0)
    for a, b in zip(before["conv_state"], saved["conv_state"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(after["conv_state"][0], saved["conv_state"][0])


def _greedy(model, ids, cache=None, steps=6):
    """Greedy decoding by hand from `cache` (or a prefill of `ids`): the tokens and every step's logits."""
    with torch.no_grad():
        if cache is None:
            out = model(ids, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        else:
            tok = ids[:, -1:]
        tokens, logits = [], []
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(tok)
            logits.append(out.logits)
    return torch.cat(tokens, 1), torch.cat(logits, 1), cache


def test_cuda_graph_decoding_off_the_gpu_changes_nothing():
    """`cuda_graph_decoding` only acts on CUDA inputs: here decoding is eager, gives the same
    logits and captures nothing; the setting is saved with the config."""
    from osdn_hf.modeling_osdn import _DECODE_GRAPHS

    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    tokens, logits, _ = _greedy(model, ids)
    model.config.cuda_graph_decoding = True
    tokens_g, logits_g, _ = _greedy(model, ids)
    assert torch.equal(tokens, tokens_g) and torch.equal(logits, logits_g)
    assert model not in _DECODE_GRAPHS
    assert OSDNConfig.from_dict(model.config.to_dict()).cuda_graph_decoding is True
    assert OSDNConfig().cuda_graph_decoding is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (this machine has none)")
def test_cuda_graph_decoding_equals_eager_decoding():
    """On a GPU, steps replayed from CUDA graphs give eager decoding's logits and states, bit for
    bit: for generate, for two caches decoded in turn, at two batch sizes, and again after a
    module is swapped (the graphs are captured anew)."""
    from osdn_hf.modeling_osdn import _DECODE_GRAPHS

    model = tiny_model().cuda()
    ids = torch.randint(1, 97, (3, 5), device="cuda")
    eager = [_greedy(model, ids[:n]) for n in (3, 1)]
    model.config.cuda_graph_decoding = True
    graphed = [_greedy(model, ids[:n]) for n in (3, 1)]
    assert len(_DECODE_GRAPHS[model].graphs) == 2
    for (tok, lg, cache), (tok_g, lg_g, cache_g) in zip(eager, graphed):
        assert torch.equal(tok, tok_g) and torch.equal(lg, lg_g)
        for layer, layer_g in zip(cache.layers, cache_g.layers):
            assert torch.equal(layer.recurrent_state, layer_g.recurrent_state)
            assert torch.equal(layer.precond_state, layer_g.precond_state)
            assert all(torch.equal(a, b) for a, b in zip(layer.conv_state, layer_g.conv_state))
    # two caches in turn: each goes on from its own state
    _, _, a = _greedy(model, ids[:1], steps=1)
    _, _, b = _greedy(model, ids[1:2], steps=1)
    turns = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=2)[1] for i, c in ((0, a), (1, b), (0, a))]
    model.config.cuda_graph_decoding = False
    _, _, a2 = _greedy(model, ids[:1], steps=1)
    _, _, b2 = _greedy(model, ids[1:2], steps=1)
    eager_turns = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=2)[1] for i, c in ((0, a2), (1, b2), (0, a2))]
    assert all(torch.equal(x, y) for x, y in zip(turns, eager_turns))
    # the same two caches on two streams at once: each stream replays graphs of its own
    model.config.cuda_graph_decoding = True
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    on_streams = []
    for i, (c, s) in enumerate(zip((a, b), streams)):
        with torch.cuda.stream(s):
            on_streams.append(_greedy(model, ids[i : i + 1, :1], cache=c, steps=3)[1])
    torch.cuda.synchronize()
    model.config.cuda_graph_decoding = False
    alone = [_greedy(model, ids[i : i + 1, :1], cache=c, steps=3)[1] for i, c in ((0, a2), (1, b2))]
    assert all(torch.equal(x, y) for x, y in zip(on_streams, alone))
    # generate: greedy, beam search (the cache reordered between steps) and sampling
    for extra in (dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=True, top_k=20)):
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0, attention_mask=torch.ones_like(ids), **extra)
        outs = []
        for flag in (True, False):
            model.config.cuda_graph_decoding = flag
            torch.manual_seed(3)
            outs.append(model.generate(ids, **kwargs))
        assert torch.equal(*outs), extra

    # float64 convolution inputs in a cache: a step cannot update them in place, so that layout
    # decodes eagerly (the next, in float32, from a graph); the same logits as eager decoding
    def doubled():
        _, _, c = _greedy(model, ids[:2], steps=1)
        for layer in c.layers:
            layer.conv_state = tuple(x.double() for x in layer.conv_state)
        return c

    model.config.cuda_graph_decoding = True
    lg_g = _greedy(model, ids[:2], cache=doubled(), steps=3)[1]
    assert None in _DECODE_GRAPHS[model].graphs.values()
    model.config.cuda_graph_decoding = False
    assert torch.equal(lg_g, _greedy(model, ids[:2], cache=doubled(), steps=3)[1])
    # a new output head: captured again, and its logits are the new head's
    model.lm_head = torch.nn.Linear(32, 97, bias=False, device="cuda")
    tok, lg, _ = _greedy(model, ids)
    model.config.cuda_graph_decoding = True
    tok_g, lg_g, _ = _greedy(model, ids)
    assert torch.equal(tok, tok_g) and torch.equal(lg, lg_g)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 3)]
    ids = torch.stack([torch.cat([torch.zeros(7 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (ids != 0).long()
    # min_new_tokens keeps EOS out, so every row runs all 10 steps
    batch = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0
    )
    for i, p in enumerate(prompts):
        alone = model.generate(
            p[None],
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(batch[i, 7:], alone[0, len(p) :])


def test_logits_to_keep_and_hidden_states():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, out.logits[:, -1:])
    assert len(out.hidden_states) == 3


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(1, 97, (2, 20))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # transformers 5.23 renamed the method; 5.17 has only the old name
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    # every parameter, the preconditioner's included, gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tied_embeddings():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()


def test_deltanet_variant_has_no_preconditioner_parameters():
    names = [n for n, _ in tiny_model(preconditioner="none").named_parameters()]
    assert not any("eta_proj" in n or "apf_proj" in n for n in names)
    no_apf = [n for n, _ in tiny_model(use_apf=False).named_parameters()]
    assert any("eta_proj" in n for n in no_apf) and not any("apf_proj" in n for n in no_apf)


def test_gate_initialisation_follows_config():
    model = tiny_model(precond_eta_init=0.3, eta_max=0.6, apf_init=0.9)
    attn = model.model.layers[0].attn
    x = torch.zeros(1, 1, 32)
    _, eta, lam = attn.gates(x)
    torch.testing.assert_close(eta, torch.full_like(eta, 0.3))
    torch.testing.assert_close(lam, torch.full_like(lam, 0.9))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 3, "divisible by num_heads"),
        ("hidden_size", 0, "`hidden_size` must be a positive integer"),
        ("preconditioner", "adam", "`preconditioner` must be one of"),
        ("precond_eta_init", 2.5, "`precond_eta_init` must lie in"),
        ("apf_init", 1.0, "`apf_init` must lie in"),
        ("eta_max", -1.0, "`eta_max` must be positive"),
        ("conv_size", 0, "`conv_size` must be a positive integer"),
        ("norm_eps", 0.0, "`norm_eps` must be positive"),
        ("expand_k", 0.3, "`expand_k`"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_config_rejects_head_dim_beyond_kernels():
    with pytest.raises(ValueError, match="head_k_dim = 512"):
        OSDNConfig(hidden_size=1024, num_heads=2)


def test_generate_continues_from_its_own_cache():
    """A second turn: generate again on the first turn's output plus new tokens, handing back the
    cache the first generate returned (under this transformers' name); the tokens equal a fresh
    generate over the whole text, which the cache spares re-reading."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6))
    first = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = output_cache(first)
    assert isinstance(cache, OSDNCache) and cache.get_seq_length() == first.sequences.shape[1] - 1
    more = torch.cat([first.sequences, torch.randint(1, 97, (1, 3))], 1)
    continued = model.generate(more, max_new_tokens=4, do_sample=False, pad_token_id=0, **{CACHE_FIELD: cache})
    assert torch.equal(continued, model.generate(more, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_bad_model_inputs_raise_value_error():
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="OSDNCache"):
        model(ids, past_key_values=((torch.zeros(1),),), use_cache=True)
    cache = output_cache(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match="`cu_seqlens` is on meta"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 5], device="meta"))


def test_malformed_inputs_are_named_before_any_layer_runs():
    """Inputs of the wrong rank, width or length, masks or `position_ids` that do not cover the
    input, `cu_seqlens` that does not pack it and a cache of another batch each raise a
    `ValueError` that names them, where torch's own errors (from the embedding, a norm, the
    convolution's padding, an index copy) said nothing of which input was wrong, or a mask of
    ones was silently dropped. The cache is left as it was."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 5))
    cache = output_cache(model(ids, use_cache=True))
    before = [cache.get_layer_state(i)["recurrent_state"].clone() for i in range(2)]
    cases = [
        (dict(input_ids=ids[0]), r"`input_ids` must be integer token ids \[batch, seq_len\], got shape \(5,\)"),
        (dict(input_ids=ids.float()), r"got shape \(2, 5\) and dtype torch.float32"),
        (dict(inputs_embeds=torch.zeros(2, 5, 16)), r"hidden_size = 32\], got shape \(2, 5, 16\)"),
        (dict(input_ids=ids[:, :0]), r"no tokens: shape \(2, 0\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long)), r"got shape \(2, 4\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(3, 5, dtype=torch.long)), r"batch = 2 .* got shape \(3, 5\)"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 2, 4])), r"rise from 0 to T = 5, got \[0, 2, 4\]"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 3, 2, 5])), r"rise from 0 to T = 5"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0.0, 5.0])), r"1-D int64 .* dtype torch.float32"),
        (dict(input_ids=ids, cu_seqlens=torch.tensor([0, 2, 5])), r"B = 1, got input_ids of shape \(2, 5\)"),
        (dict(input_ids=ids[:1, :1], cache=cache, use_cache=True), r"states of 2 sequences, but the input has 1"),
        (dict(input_ids=ids[:1], cache=cache, cu_seqlens=torch.tensor([0, 5])), r"states of 2 sequences, .* has 1"),
        (dict(input_ids=ids[:1], position_ids=torch.arange(4)[None]), r"\(1, 5\) for this input, got shape \(1, 4\)"),
        (dict(input_ids=ids[0], position_ids=torch.arange(5)[None]), r"`input_ids` must be integer token ids"),
        (dict(input_ids=ids[:1], cu_seqlens=torch.tensor([0, 5]), cu_seq_lens_q=torch.tensor([0, 5])), "not both"),
    ]
    with torch.no_grad():
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                model(**kwargs)
    assert all(torch.equal(cache.get_layer_state(i)["recurrent_state"], before[i]) for i in range(2))
    # A layer called alone checks what it is given too.
    attn = model.model.layers[0].attn
    with pytest.raises(ValueError, match=r"B = 1, got hidden_states of shape \(2, 5, 32\)"):
        attn(torch.zeros(2, 5, 32), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="states of 2 sequences, but the input has 3"):
        attn(torch.zeros(3, 1, 32), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_padding_free_collator_packs_sequences(flash_kwargs):
    """transformers' `DataCollatorWithFlattening` packs a batch into one row and marks where each
    sequence begins by restarting `position_ids` (and, when asked, with the flash-attention
    offsets `cu_seq_lens_q`): the state resets there, so logits, loss and gradients are those of
    each sequence alone, on the Triton kernels where a GPU is present. (Before, the model read
    neither and carried the state across.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model().to(device)
    seqs = [torch.randint(1, 97, (n,)).tolist() for n in (5, 9, 3)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s, "labels": s} for s in seqs]
    )
    assert ("cu_seq_lens_q" in batch) == flash_kwargs and "position_ids" in batch
    packed = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    packed.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [model(torch.tensor([s], device=device), labels=torch.tensor([s], device=device)) for s in seqs]
    torch.testing.assert_close(packed.logits[0], torch.cat([a.logits[0] for a in alone]), atol=1e-5, rtol=1e-5)
    counted = [len(s) - 1 for s in seqs]  # each sequence's first token predicts nothing before it
    loss = sum(a.loss * n for a, n in zip(alone, counted)) / sum(counted)
    torch.testing.assert_close(packed.loss, loss)
    loss.backward()
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


def test_position_ids_beside_a_padding_mask_pack_nothing():
    """A one-row batch with left padding and the position ids transformers derives from its mask
    (0 at the pads, then 0, 1, ...): the mask says where the tokens are, so the position ids, which
    restart there, are not read as packed sequences; the logits are those without them."""
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits, plain)


def test_cache_under_either_name():
    """The cache goes in as `cache` (transformers >= 5.24, what generate passes there) or as
    `past_key_values` (before), and comes back under the installed version's output field."""
    model = tiny_model()
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        steps = {}
        for name in ("cache", "past_key_values"):
            cache = output_cache(model(ids[:, :8], use_cache=True))
            assert isinstance(cache, OSDNCache) and cache.get_seq_length() == 8
            steps[name] = model(ids[:, 8:], use_cache=True, **{name: cache}).logits[:, -1]
            assert cache.get_seq_length() == 9
    for name, logits in steps.items():
        torch.testing.assert_close(logits, full, atol=LOGITS_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("name, fla_millions", [("osdn-340m", 374.4), ("osdn-1.3b", 1365.7)])
def test_published_sizes_parameter_count(name, fla_millions):
    """SPEC section 6: fla DeltaNet's count plus the preconditioner projections."""
    config = AutoConfig.from_pretrained(REPO / "configs" / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    L, H, D = config.num_hidden_layers, config.num_heads, config.hidden_size
    precond = L * 2 * (H * D + H)  # eta_proj and apf_proj, weights and biases
    assert round((total - precond) / 1e6, 1) == fla_millions
    assert precond / 1e6 == pytest.approx({"osdn-340m": 0.4, "osdn-1.3b": 1.6}[name], abs=0.05)


def test_published_sizes_match_fla_deltanet_exactly():
    """fla's DeltaNet of each published size has our weights' names and shapes, less the
    preconditioner's; so does the peer the benchmarks build (`fla_deltanet_kwargs`)."""
    from osdn_hf.throughput import fla_deltanet_kwargs

    fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention (the test extra) is not installed")
    for name in ("osdn-340m", "osdn-1.3b"):
        config = AutoConfig.from_pretrained(REPO / "configs" / name)
        fla_config = fla_models.DeltaNetConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_heads=config.num_heads,
            vocab_size=config.vocab_size,
            intermediate_size=config.intermediate_size,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            ours = AutoModelForCausalLM.from_config(config).state_dict()
            theirs = fla_models.DeltaNetForCausalLM(fla_config).state_dict()
            peer = fla_models.DeltaNetForCausalLM(fla_models.DeltaNetConfig(**fla_deltanet_kwargs(config))).state_dict()
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items() if k in theirs}
        assert {k: v.shape for k, v in peer.items()} == {k: v.shape for k, v in theirs.items()}
        assert all("eta_proj" in k or "apf_proj" in k for k in ours if k not in theirs)


def test_tiny_config_is_the_demo_default():
    from osdn_hf.demo import DEMO_CONFIG

    saved = json.loads((REPO / "configs" / "osdn-tiny" / "config.json").read_text())
    assert {k: saved[k] for k in DEMO_CONFIG} == DEMO_CONFIG
    assert OSDNConfig(**{k: v for k, v in saved.items() if k not in ("architectures", "model_type")}).head_k_dim == 64


def test_bench_decode_conv_times_both_ways_and_restores_the_step(tmp_path):
    """scripts/bench_decode_conv.py: both ways of the step at each width, generation with each
    (the same tokens: the two ways agree), the JSON written, and `_one_step` put back after."""
    from bench_decode_conv import main

    original = ShortConvolution._one_step
    out = tmp_path / "decode_conv.json"
    result = main(
        ["--out", str(out), "--widths", "8", "--layers", "2", "--tokens", "3", "--rounds", "2", "--calls", "2"]
    )
    assert ShortConvolution._one_step is original
    assert json.loads(out.read_text()) == result
    assert set(result["step_us"]["8"]) == {"one_step", "conv1d"}
    assert all(len(x["rounds"]) == 2 and x["median"] > 0 for x in result["step_us"]["8"].values())
    assert result["generate"]["same_tokens"] and result["generate"]["layers"] == 2
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--rounds", "0"])


def test_bench_generate_times_each_way_and_plots(tmp_path):
    """scripts/bench_generate.py on the CPU: our eager generation timed per round, the GPU-only
    ways recorded as not run with the reason, the JSON and the plot written; bad counts refused."""
    from bench_generate import main

    out = tmp_path / "generate.json"
    argv = ["--config", str(REPO / "configs/osdn-tiny"), "--batch-sizes", "1", "2", "--new-tokens", "2"]
    result = main([*argv, "--rounds", "2", "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").stat().st_size > 0
    assert [r["B"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert set(row["ms_per_token"]) == {"osdn_eager"}
        assert len(row["ms_per_token"]["osdn_eager"]["rounds"]) == 2 and row["ms_per_token"]["osdn_eager"]["median"] > 0
    assert set(result["skipped"]) == {"osdn_cuda_graphs", "fla_deltanet"}
    assert result["command"].startswith("python scripts/bench_generate.py")
    with pytest.raises(SystemExit):
        main([*argv, "--rounds", "0", "--out", str(out)])
