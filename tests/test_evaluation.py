"""Perplexity on a local file, and the model inside lm-evaluation-harness's HFLM."""

from __future__ import annotations

import math

import pytest
import torch
from test_hf_integration import tokenizer  # noqa: F401  (module-scoped fixture)
from test_model import tiny_model

from osdn_hf.evaluation import perplexity


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
    import eval_perplexity

    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("Friends, Romans, countrymen, lend me your ears;\n" * 5)
    result = eval_perplexity.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--file",
            str(tmp_path / "t.txt"),
            "--block-size",
            "16",
            "--out",
            str(tmp_path / "ppl.json"),
        ]
    )
    assert result["perplexity"] > 1 and (tmp_path / "ppl.json").exists()


def test_lm_eval_hflm_runs_a_local_task(tmp_path, tokenizer):  # noqa: F811
    """lm-evaluation-harness's HFLM wraps the model object; a multiple-choice task from a local file."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra; install osdn-hf[test]")
    import json
    import textwrap

    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=2, max_length=128)
    ((ll, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("To be, or not", " to be"), 0)])
    ctx, cont = tokenizer("To be, or not")["input_ids"], tokenizer(" to be")["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    assert ll == pytest.approx(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)), abs=1e-4)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("ROMEO:", {"until": ["\n\n"], "max_gen_toks": 5}), 0)])
    assert isinstance(text, str)

    rows = [("To be, or not to", [" be", " cat"]), ("Friends, Romans,", [" countrymen", " fish"])]
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in rows)
    )
    (tmp_path / "tiny.yaml").write_text(
        textwrap.dedent(f"""\
        task: osdn_tiny_choice
        dataset_path: json
        dataset_kwargs:
          data_files: {tmp_path / "data.jsonl"}
        test_split: train
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """)
    )
    result = simple_evaluate(model=lm, tasks=["osdn_tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert 0.0 <= result["results"]["osdn_tiny_choice"]["acc,none"] <= 1.0
