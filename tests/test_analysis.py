"""MQAR data, the MQAR driver, and the recall/write residual diagnostics."""

from __future__ import annotations

import json

import pytest
import torch

from osdn_hf.analysis import recall_residual
from osdn_hf.data import shakespeare_texts, train_bpe_tokenizer
from osdn_hf.mqar import (
    _plan_checkpoint,
    answer_loss,
    at_defaults,
    build_model,
    main,
    mqar_batch,
    mqar_mixture_batch,
    parse_args,
    row_settings,
    settings_of,
    train_one,
    train_pairs,
)
from osdn_hf.ops import naive_recurrent_osdn
from osdn_hf.ops.osdn.utils import l2norm


def test_mqar_batch_layout():
    g = torch.Generator().manual_seed(0)
    ids, labels, context = mqar_batch(4, 64, 8, 100, g)
    assert ids.shape == labels.shape == context.shape == (4, 64)
    for b in range(4):
        keys, values = ids[b, 0:16:2], ids[b, 1:16:2]
        assert len(set(keys.tolist())) == 8 and keys.min() >= 1 and keys.max() < 50 and values.min() >= 50
        answers = (labels[b] != -100).nonzero().squeeze(-1)
        assert len(answers) == 8 and answers.min() >= 17  # queries come after the context
        for pos in answers.tolist():  # HF convention: label t is predicted at t - 1, the query key
            key = ids[b, pos - 1].item()
            assert labels[b, pos] == values[keys.tolist().index(key)] == ids[b, pos]
    assert context[:, :16].all() and not context[:, 16:].any()
    with pytest.raises(ValueError, match="4 \\* num_pairs"):
        mqar_batch(1, 30, 8, 100, g)


def test_mqar_training_mixture():
    """Zoology-style training batches: the batch split over P and its halvings, answers counted per row."""
    assert train_pairs(64, 1) == [64] and train_pairs(64, 4) == [8, 16, 32, 64] and train_pairs(8, 4) == [4, 8]
    with pytest.raises(ValueError, match="train-mix"):
        train_pairs(64, 0)
    ids, labels, context = mqar_mixture_batch(10, 64, [4, 8], 100, torch.Generator().manual_seed(0))
    assert ids.shape == (10, 64)
    assert (labels != -100).sum(1).tolist() == [4] * 5 + [8] * 5
    assert context.sum(1).tolist() == [8] * 5 + [16] * 5
    with pytest.raises(ValueError, match="cannot hold"):
        mqar_mixture_batch(1, 64, [4, 8], 100, torch.Generator())


@pytest.mark.parametrize("name", ["osdn", "deltanet"])
def test_recall_residual_matches_a_direct_computation(name):
    model = build_model(name, d_model=32, vocab_size=50, num_heads=2, seed=0).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.b_proj.weight.normal_(0, 0.5)
    ids = torch.randint(1, 50, (2, 40))
    positions = torch.zeros(2, 40, dtype=torch.bool)
    positions[:, :20] = True
    got = recall_residual(model, ids, positions=positions)

    hidden = model.model(ids, output_hidden_states=True).hidden_states
    for i, block in enumerate(model.model.layers):
        q, k, v, beta, eta, lam, _ = block.attn.project(block.attn_norm(hidden[i]))
        k = l2norm(k)
        _, S, _ = naive_recurrent_osdn(q, k, v, beta, eta, lam, output_final_state=True)
        pred = torch.einsum("bhkv,bthk->bthv", S, k.float())
        ratio = ((pred - v) ** 2).sum(-1) / (v**2).sum(-1)
        assert got[i]["recall_residual"] == pytest.approx(ratio[:, :20].mean().item(), rel=1e-4)
        if name == "deltanet":  # d = 1: the write residual is 1 - beta ||k||^2 (||k|| is 1 up to the norm's eps)
            expected = (1 - beta * (k.float() ** 2).sum(-1)).abs()[:, :20].mean()
            assert got[i]["write_residual"] == pytest.approx(expected.item(), rel=1e-4)


def test_padding_writes_nothing_in_recall_residual():
    model = build_model("osdn", d_model=32, vocab_size=50, num_heads=2, seed=0).eval()
    ids = torch.randint(1, 50, (1, 30))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    a = recall_residual(model, ids)
    b = recall_residual(model, padded, attention_mask=mask)
    for x, y in zip(a, b):
        assert x["recall_residual"] == pytest.approx(y["recall_residual"], rel=1e-4)
        assert x["write_residual"] == pytest.approx(y["write_residual"], rel=1e-4)


def test_mqar_loss_scores_only_the_answers():
    """The model's (shifted) loss must score exactly the prediction made at each query key."""
    model = build_model("deltanet", d_model=32, vocab_size=64, num_heads=2, seed=0).eval()
    ids, labels, _ = mqar_batch(2, 64, 8, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=labels)
    query = torch.zeros_like(ids, dtype=torch.bool)
    query[:, :-1] = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(out.logits[query], ids.roll(-1, 1)[query])
    torch.testing.assert_close(out.loss, expected)
    assert (ids[query] < 32).all()  # the positions scored hold keys
    # what the sweep trains on: logits at the query positions only, the same loss
    torch.testing.assert_close(answer_loss(model, ids, labels), out.loss)


def test_train_one_runs_and_reports():
    row = train_one(
        "osdn_no_apf",
        d_model=32,
        seq_len=64,
        num_pairs=8,
        lr=3e-3,
        steps=6,
        batch_size=8,
        vocab_size=64,
        num_heads=2,
        seed=0,
        eval_every=3,
        device="cpu",
        progress=False,
    )
    assert 0.0 <= row["accuracy"] <= 1.0 and row["recall_residual"] >= 0 and len(row["curve"]) == 2
    assert [r["layer"] for r in row["residuals_per_layer"]] == [0, 1]


def test_a_run_stopped_by_the_deadline_resumes_where_it_stopped(tmp_path, monkeypatch):
    """With a resume directory, a run cut short saves its state, and the next call finishes it with
    the same curve and residuals as a run never stopped; the checkpoint is then deleted."""
    run = dict(d_model=32, seq_len=64, num_pairs=8, lr=3e-3, steps=6, batch_size=8, vocab_size=64, num_heads=2)
    run |= dict(seed=0, eval_every=2, device="cpu", progress=False)
    whole = train_one("osdn", **run)
    clock = iter(range(10**6))  # one tick per reading: the deadline falls before the fourth step
    monkeypatch.setattr("osdn_hf.mqar.time.time", lambda: float(next(clock)))
    assert train_one("osdn", **run, deadline=3.0, resume_dir=tmp_path) is None
    (ckpt,) = tmp_path.glob("*.pt")
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    resumed = train_one("osdn", **run, resume_dir=tmp_path)
    assert resumed["pieces"] == 2 and whole["pieces"] == 1
    assert resumed["curve"] == whole["curve"] and [c["step"] for c in whole["curve"]] == [2, 4, 6]
    assert resumed["residuals_per_layer"] == whole["residuals_per_layer"]
    assert not list(tmp_path.glob("*.pt"))
    # a checkpoint is only ever continued by the run it belongs to
    train_one("osdn", **run, deadline=0.0, resume_dir=tmp_path)
    (ckpt,) = tmp_path.glob("*.pt")
    state = torch.load(ckpt, weights_only=False)
    state["run"]["lr"] = 1e-2
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="is of another run"):
        train_one("osdn", **run, resume_dir=tmp_path)
    state["run"]["lr"], state["device_type"] = 3e-3, "cuda"  # as if saved on a GPU
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="was saved on cuda, not cpu"):
        train_one("osdn", **run, resume_dir=tmp_path)


def test_sweep_continues_runs_saved_at_the_deadline(tmp_path):
    """`--resume-dir`: the sweep's deadline saves the run in progress; the next sweep continues it."""
    out, saved = tmp_path / "mqar.json", tmp_path / "resume"
    args = ["--out", str(out), "--models", "deltanet", "--d-models", "32", "--settings", "64:8", "--lrs", "3e-3"]
    args += ["--steps", "4", "--batch-size", "4", "--vocab-size", "64", "--eval-every", "2", "--resume-dir", str(saved)]
    main([*args, "--deadline", "0"])
    (ckpt,) = saved.glob("*.pt")
    assert not out.exists()
    # the name the sweep looks for, to put started runs first, is the one the run saved under
    assert ckpt.name == _plan_checkpoint(parse_args(args), (64, 8, 32, 3e-3, "deltanet", {}))
    main(args)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["pieces"] == 2 and row["device"] == "cpu" and not list(saved.glob("*.pt"))


def test_sweep_writes_rows_and_plot_and_resumes(tmp_path):
    out = tmp_path / "mqar.json"
    args = [
        "--out",
        str(out),
        "--models",
        "osdn",
        "deltanet",
        "--d-models",
        "32",
        "--settings",
        "64:8",
        "--lrs",
        "3e-3",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--vocab-size",
        "64",
        "--eval-every",
        "2",
        "--train-mix",
        "2",
    ]
    main(args)
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"osdn", "deltanet"} and rows[0]["train_pairs"] == [4, 8]
    assert {"model", "d_model", "seq_len", "num_pairs", "lr", "accuracy", "recall_residual"} <= set(rows[0])
    assert out.with_suffix(".png").stat().st_size > 0
    main(args)  # everything is done: nothing is trained twice
    assert len(json.loads(out.read_text())["rows"]) == 2


def test_sweep_splits_over_workers_and_merges(tmp_path):
    """Two worker processes share the runs; the merged file holds each run once, and a rerun adds none."""
    out = tmp_path / "mqar.json"
    args = ["--out", str(out), "--models", "osdn", "deltanet", "--d-models", "32", "--settings", "64:8"]
    args += ["--lrs", "3e-3", "1e-2", "--steps", "2", "--batch-size", "4", "--vocab-size", "64", "--eval-every", "2"]
    main([*args, "--workers", "2"])
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["model"], r["lr"]) for r in rows) == [
        ("deltanet", 3e-3),
        ("deltanet", 1e-2),
        ("osdn", 3e-3),
        ("osdn", 1e-2),
    ]
    assert not list(tmp_path.glob("*.worker*.json"))
    main([*args, "--workers", "2"])
    assert len(json.loads(out.read_text())["rows"]) == 4
    main([*args, "--steps", "3", "--deadline", "0"])  # a run cut short by the deadline is not recorded
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_sweep_merges_shards_left_by_a_killed_run(tmp_path):
    """Rows in worker shards whose parent was killed before merging are kept, not run again, and
    every row names the commit it ran at."""
    out = tmp_path / "mqar.json"
    args = ["--out", str(out), "--models", "osdn", "--d-models", "32", "--settings", "64:8", "--lrs", "3e-3"]
    args += ["--steps", "2", "--batch-size", "4", "--vocab-size", "64", "--eval-every", "2"]
    main([*args, "--out", str(tmp_path / "mqar.worker0.json"), "--commit", "abc"])  # as a worker would leave it
    assert not out.exists()
    main([*args, "--lrs", "3e-3", "1e-2", "--workers", "2", "--commit", "def"])
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["lr"], r["commit"]) for r in rows) == [(3e-3, "abc"), (1e-2, "def")]
    assert not list(tmp_path.glob("*.worker*.json"))
    command = json.loads(out.read_text())["command"]
    assert "--workers 2" in command and "--shard" not in command  # the sweep's, not a worker's


def test_sweep_over_preconditioner_settings(tmp_path):
    """`--precond-eta-init` / `--apf-init` sweep the preconditioner: each model runs with the settings
    that affect it (DeltaNet once), invalid combinations are skipped, and rows record what ran."""
    out = tmp_path / "mqar.json"
    args = ["--out", str(out), "--d-models", "32", "--settings", "64:8", "--lrs", "3e-3", "--steps", "2"]
    args += ["--batch-size", "4", "--vocab-size", "64", "--eval-every", "2"]
    args += ["--precond-eta-init", "0.5", "2.5", "--apf-init", "0.9"]  # 2.5 > eta_max = 2: skipped
    main(args)
    rows = json.loads(out.read_text())["rows"]
    got = sorted((r["model"], tuple(sorted(r["config_overrides"].items()))) for r in rows)
    assert got == [
        ("deltanet", ()),
        ("osdn", (("apf_init", 0.9), ("precond_eta_init", 0.5))),
        ("osdn_no_apf", (("precond_eta_init", 0.5),)),
    ]
    osdn = next(r for r in rows if r["model"] == "osdn")
    assert osdn["preconditioner_config"] == {"precond_eta_init": 0.5, "eta_max": 2.0, "apf_init": 0.9}
    main(args)  # done rows are recognised with their settings: nothing runs twice
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_settings_sweep_plots_one_bar_per_run(tmp_path):
    """A result whose every row carries preconditioner overrides is drawn as labelled bars."""
    out = tmp_path / "mqar.json"
    args = ["--out", str(out), "--models", "osdn", "--d-models", "32", "--settings", "64:8", "--lrs", "3e-3"]
    args += ["--steps", "2", "--batch-size", "4", "--vocab-size", "64", "--eval-every", "2", "--eta-max", "1", "2"]
    main(args)
    png = out.with_suffix(".png")
    png.unlink()
    main(["--out", str(out), "--plot-only"])
    assert png.stat().st_size > 1000


def test_runs_are_told_apart_by_the_settings_they_ran_with(tmp_path):
    """A run recorded under earlier defaults (eta_max 1) does not count as done once the defaults
    change; the three-model plot draws only runs at the current defaults; a row that does not say
    what it ran with is refused by name."""
    out = tmp_path / "mqar.json"
    args = ["--out", str(out), "--models", "osdn", "deltanet", "--d-models", "32", "--settings", "64:8"]
    args += ["--lrs", "3e-3", "--steps", "2", "--batch-size", "4", "--vocab-size", "64", "--eval-every", "2"]
    main(args)
    result = json.loads(out.read_text())
    old = next(r for r in result["rows"] if r["model"] == "osdn")
    old["preconditioner_config"]["eta_max"] = 1.0  # as if run before eta_max became 2
    old["accuracy"] = 0.5
    out.write_text(json.dumps(result))
    assert [r["model"] for r in at_defaults(result["rows"])] == ["deltanet"]
    main(args)  # OSDN reruns at the current defaults, DeltaNet (no preconditioner settings) does not
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["model"], row_settings(r).get("eta_max")) for r in rows) == [
        ("deltanet", None),
        ("osdn", 1.0),
        ("osdn", 2.0),
    ]
    assert settings_of("osdn_no_apf", {"apf_init": 0.9}) == {"precond_eta_init": 0.9, "eta_max": 2.0}
    del rows[0]["preconditioner_config"]
    with pytest.raises(ValueError, match="without 'preconditioner_config'"):
        at_defaults(rows)


def test_recall_residual_on_text_trains_both_models_and_measures_checkpoints(tmp_path):
    """`scripts/recall_text.py`: OSDN and DeltaNet trained alike on Shakespeare, then measured
    per layer on held-out blocks (JSON and PNG); a saved checkpoint is measured as it is."""
    from osdn_hf.recall_text import main as recall_text

    out = tmp_path / "r.json"
    small = ["--max-chars", "40000", "--eval-blocks", "2", "--eval-block-size", "64", "--block-size", "32"]
    result = recall_text([*small, "--steps", "2", "--batch-size", "2", "--out", str(out)])
    assert [(r["model"], r["layer"]) for r in result["rows"]] == [
        ("osdn", 0),
        ("osdn", 1),
        ("deltanet", 0),
        ("deltanet", 1),
    ]
    assert all(r["recall_residual"] >= 0 and r["write_residual"] >= 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"] and out.with_suffix(".png").stat().st_size > 0

    tok = train_bpe_tokenizer(shakespeare_texts(40000), vocab_size=300)
    model = build_model("deltanet", 32, len(tok), 2, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    again = recall_text([*small, "--models", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c.json")])
    assert {r["model"] for r in again["rows"]} == {str(tmp_path / "ckpt")} and again["steps"] is None
    with pytest.raises(ValueError, match="held-out blocks"):
        recall_text([*small, "--eval-blocks", "1000", "--out", str(tmp_path / "x.json")])
