"""Perplexity on a local file, and the model inside lm-evaluation-harness's HFLM."""

from __future__ import annotations

import math

import pytest
import torch

from osdn_hf.evaluation import perplexity
from test_hf_integration import tokenizer  # noqa: F401  (module-scoped fixture)
from test_model import tiny_model


def test_carried_state_perplexity_equals_one_full_pass(tokenizer):  # noqa: F811
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    blocks = perplexity(model, tokenizer, text, block_size=7)  # many blocks, each continuing the cache
    assert blocks["scored_tokens"] == ids.shape[1] - 1
    assert blocks["perplexity"] == pytest.approx(math.exp(full.item()), rel=1e-4)
    alone = perplexity(model, tokenizer, text, block_size=7, carry_state=False)
    assert alone["scored_tokens"] < blocks["scored_tokens"]


def test_eval_perplexity_script(tmp_path, tokenizer):  # noqa: F811
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import eval_perplexity

    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("Friends, Romans, countrymen, lend me your ears;\n" * 5)
    result = eval_perplexity.main(["--model", str(tmp_path / "m"), "--file", str(tmp_path / "t.txt"),
                                   "--block-size", "16", "--out", str(tmp_path / "ppl.json")])
    assert result["perplexity"] > 1 and (tmp_path / "ppl.json").exists()
