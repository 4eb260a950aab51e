"""scripts/convert_deltanet.py: an fla DeltaNet checkpoint becomes an OSDN checkpoint with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention (the test extra) is not installed")

from fla_reference import fla_on_cpu  # noqa: E402

from osdn_hf.convert import convert_deltanet, osdn_config_from_deltanet  # noqa: E402

# SPEC section 8: the converted model reproduces DeltaNet's logits within float32 1e-4.
LOGITS_ATOL = 1e-4


def tiny_fla_deltanet(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=2,
        vocab_size=101,
        fuse_norm=False,
        fuse_swiglu=False,
        fuse_cross_entropy=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    model = fla_models.DeltaNetForCausalLM(fla_models.DeltaNetConfig(**kwargs)).eval()
    with torch.no_grad():  # trained-looking weights: varied beta, non-trivial convolutions and norms
        for name, p in model.named_parameters():
            if "b_proj" in name or "conv1d" in name:
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_converted_model_reproduces_deltanet_logits(tmp_path, tie):
    fla_model = tiny_fla_deltanet(tie_word_embeddings=tie)
    fla_model.save_pretrained(tmp_path / "fla")
    ids = torch.randint(0, 101, (2, 90))
    with torch.no_grad(), fla_on_cpu():
        expected = fla_model(ids).logits

    convert_deltanet(tmp_path / "fla", tmp_path / "osdn")
    config = json.loads((tmp_path / "osdn" / "config.json").read_text())
    assert config["model_type"] == "osdn" and config["preconditioner"] == "osdn"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "osdn").eval()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)
    # the DeltaNet weights themselves are copied bit for bit
    theirs = fla_model.state_dict()
    for name, tensor in model.state_dict().items():
        if name in theirs:
            assert torch.equal(tensor, theirs[name]), name


def test_fine_tuning_moves_the_preconditioner(tmp_path):
    tiny_fla_deltanet().save_pretrained(tmp_path / "fla")
    model = convert_deltanet(tmp_path / "fla", tmp_path / "osdn").train()
    ids = torch.randint(0, 101, (4, 64))

    def preconds():
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        return torch.stack([cache.get_layer_state(i)["precond_state"] for i in range(2)])

    before = preconds()
    eta_proj = model.model.layers[0].attn.eta_proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert (before - 1).abs().max() < 1e-4  # d_t starts at 1, up to eta_init
    # the preconditioner's projections get gradients and move, and with them d_t
    assert (model.model.layers[0].attn.eta_proj.weight - eta_proj).abs().max() > 1e-3
    assert (preconds() - before).abs().max() > 1e-7


@pytest.mark.parametrize("field, value", [("allow_neg_eigval", True), ("qk_norm", "sum"), ("use_beta", False)])
def test_unsupported_deltanet_options_are_refused(field, value):
    config = {
        "model_type": "delta_net",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_heads": 2,
        "vocab_size": 10,
        field: value,
    }
    with pytest.raises(ValueError, match=field):
        osdn_config_from_deltanet(config)


def test_not_a_deltanet_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        convert_deltanet(tmp_path, tmp_path / "out")
