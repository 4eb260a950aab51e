"""osdn_hf.throughput: side-by-side training throughput in alternating rounds."""

from __future__ import annotations

import json

import gpu_model_evidence  # scripts/, on the path through conftest.py
import pytest
import torch

from osdn_hf import OSDNConfig, OSDNForCausalLM
from osdn_hf.throughput import alternate, alternating_rounds, measure_alone, ratio_summary, training_step


def test_alternate_reverses_the_order_every_round_and_takes_the_ratio_per_round():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = alternate(steps, tokens_per_step=100, steps=2, rounds=3, device="cpu")
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert result["orders"] == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert all(len(v) == 3 and min(v) > 0 for v in result["tokens_per_s"].values())
    ratios = [x / y for x, y in zip(result["tokens_per_s"]["a"], result["tokens_per_s"]["b"])]
    assert result["ratio"]["of"] == "a / b"
    assert result["ratio"]["per_round"] == pytest.approx(ratios)
    assert result["ratio"]["min"] <= result["ratio"]["median"] <= result["ratio"]["max"]
    with pytest.raises(ValueError, match="rounds"):
        alternate(steps, 100, steps=2, rounds=0, device="cpu")


def test_alternating_rounds_with_any_measure_as_the_kernel_benchmark_uses_them():
    """What `scripts/bench_kernels.py` times ours and fla's kernels with: a measure per call
    (there `do_bench`), four functions, the order reversed every round."""
    seen = []
    fns = {name: name for name in ("osdn_fwd", "fla_fwd", "osdn_fwdbwd", "fla_fwdbwd")}
    times = {"osdn_fwd": [3.0, 2.0], "fla_fwd": [1.0, 2.0], "osdn_fwdbwd": [8.0, 6.0], "fla_fwdbwd": [4.0, 2.0]}
    queues = {name: iter(ts) for name, ts in times.items()}  # each call measures the next value
    values, orders = alternating_rounds(fns, lambda name: seen.append(name) or next(queues[name]), 2)
    assert seen == list(fns) + list(fns)[::-1] and orders == [list(fns), list(fns)[::-1]]
    assert values == times
    summary = ratio_summary(values["osdn_fwdbwd"], values["fla_fwdbwd"], "osdn / fla")
    assert summary == {"of": "osdn / fla", "per_round": [2.0, 3.0], "median": 2.5, "min": 2.0, "max": 3.0}
    with pytest.raises(ValueError, match="rounds"):
        alternating_rounds(fns, len, 0)


def test_training_step_trains_and_measure_alone_counts_tokens():
    torch.manual_seed(0)
    config = OSDNConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)
    model = OSDNForCausalLM(config)
    before = [p.detach().clone() for p in model.parameters()]
    step = training_step(model, batch=2, seq=16, device="cpu")
    result = measure_alone(step, tokens_per_step=32, steps=2, device="cpu", warmup=1)
    assert result["steps"] == 2 and result["tokens_per_s"] > 0 and result["peak_mib"] is None
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the optimizer stepped


def test_gpu_model_evidence_dry_run_on_cpu(tmp_path):
    """`scripts/gpu_model_evidence.py` on the tiny config runs every stage on CPU (fla's
    comparison needs CUDA and is left out): finite gradients, Trainer steps, 128 generated tokens,
    and identical logits after save and reload."""
    out = tmp_path / "evidence.json"
    gpu_model_evidence.main(
        ["--config", "configs/osdn-tiny", "--out", str(out), "--steps", "2", "--batch", "2", "--seq", "64"]
    )
    result = json.loads(out.read_text())
    assert result["fwd_bwd"]["grads_finite"] and result["trainer"]["steps"] == 2
    assert result["generate"]["new_tokens"] == 128
    assert result["save_reload"] == {"dtype": "torch.float32", "identical_logits": True}
    assert "throughput_osdn" not in result  # CUDA only


def test_gpu_model_evidence_checks_get_a_copy_of_the_config(tmp_path, monkeypatch):
    """The checks save a bf16 model, and `save_pretrained` writes its dtype into the config it
    was built from: they get a copy, so the throughput models are still built from the config as
    loaded (float32 weights, like fla's), not in pure bf16."""
    script = gpu_model_evidence
    loaded, seen = [], []
    load = script.AutoConfig.from_pretrained
    monkeypatch.setattr(
        script.AutoConfig, "from_pretrained", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]
    )

    def checks(config, *args):  # what saving the bf16 model does to the config it gets
        config.dtype = torch.bfloat16
        seen.append(config)

    monkeypatch.setattr(script, "model_checks", checks)
    script.main(["--config", "configs/osdn-tiny", "--out", str(tmp_path / "e.json"), "--seq", "64"])
    assert len(loaded) == 1 and len(seen) == 1 and seen[0] is not loaded[0]
    assert loaded[0].dtype != torch.bfloat16 and seen[0].dtype == torch.bfloat16
