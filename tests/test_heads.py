"""Sequence classification, token classification and question answering on the OSDN base model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_without_the_package
from test_model import tiny_config, tiny_model
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorWithFlattening,
)

from osdn_hf import OSDNForQuestionAnswering, OSDNForSequenceClassification, OSDNForTokenClassification
from osdn_hf.modeling_osdn import output_cache

# Where a GPU is present, the comparisons with each sequence alone run on the Triton kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = [
    (AutoModelForSequenceClassification, OSDNForSequenceClassification),
    (AutoModelForTokenClassification, OSDNForTokenClassification),
    (AutoModelForQuestionAnswering, OSDNForQuestionAnswering),
]


def tiny_head(cls, device: str = "cpu", **overrides):
    """A head on `tiny_model`'s base (gates that vary per head and token), the head random."""
    torch.manual_seed(1)
    head = cls(tiny_config(**overrides)).eval()
    head.model.load_state_dict(tiny_model(**overrides).model.state_dict())
    return head.to(device)


def sequences(*lengths: int, device: str = "cpu") -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randint(1, 97, (1, n)).to(device) for n in lengths]


def padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`: the sequences padded with id 0 on `side`."""
    width = max(s.shape[1] for s in seqs)
    rows, masks = [], []
    for s in seqs:
        pad = s.new_zeros(1, width - s.shape[1])
        rows.append(torch.cat([pad, s] if side == "left" else [s, pad], 1))
        masks.append(torch.cat([pad, torch.ones_like(s)] if side == "left" else [torch.ones_like(s), pad], 1))
    return torch.cat(rows), torch.cat(masks)


@pytest.mark.parametrize("auto, cls", HEADS)
def test_heads_are_registered_and_take_a_causal_lm_checkpoint(tmp_path, auto, cls):
    config = AutoConfig.for_model("osdn", vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2)
    assert isinstance(auto.from_config(config), cls)
    lm = tiny_model()
    lm.save_pretrained(tmp_path / "lm")
    head = auto.from_pretrained(tmp_path / "lm", num_labels=4)
    assert isinstance(head, cls)
    base = lm.model.state_dict()
    for name, weight in head.model.state_dict().items():
        assert torch.equal(weight, base[name]), name
    head.save_pretrained(tmp_path / "head")
    again = auto.from_pretrained(tmp_path / "head")
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["left", "right", "right, pad ids without a mask", "cu_seqlens", "collator"])
def test_sequence_classification_reads_each_sequence_at_its_last_token(layout):
    model = tiny_head(OSDNForSequenceClassification, DEVICE, num_labels=3)
    seqs = sequences(9, 5, 7, device=DEVICE)
    with torch.no_grad():
        alone = torch.cat([model(s).logits for s in seqs])
        if layout in ("left", "right"):
            ids, mask = padded(seqs, layout)
            logits = model(ids, attention_mask=mask).logits
        elif layout == "right, pad ids without a mask":  # transformers' rule: the last id that is not padding
            logits = model(padded(seqs, "right")[0]).logits
        elif layout == "cu_seqlens":
            cu_seqlens = torch.tensor([0, 9, 14, 21], device=DEVICE)
            logits = model(torch.cat(seqs, 1), cu_seqlens=cu_seqlens).logits
        else:
            batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s[0].tolist()} for s in seqs])
            logits = model(batch["input_ids"].to(DEVICE), position_ids=batch["position_ids"].to(DEVICE)).logits
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_sequence_classification_losses_and_gradients():
    model = tiny_head(OSDNForSequenceClassification, num_labels=3).train()
    ids, mask = padded(sequences(9, 5, 7), "left")
    labels = torch.tensor([0, 2, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    regression = tiny_head(OSDNForSequenceClassification, num_labels=1)
    out = regression(ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0, 2.0]))
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.view(-1), torch.tensor([0.5, -1.0, 2.0])))

    multi = tiny_head(OSDNForSequenceClassification, num_labels=3, problem_type="multi_label_classification")
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = multi(ids, attention_mask=mask, labels=targets)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))

    with pytest.raises(ValueError, match="one entry a sequence, 3 here"):
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one entry a sequence, 2 here"):  # two packed sequences
        model(torch.cat(sequences(9, 5), 1), cu_seqlens=torch.tensor([0, 9, 14]), labels=torch.tensor([0, 1, 2]))


def test_sequence_classification_returns_a_cache_that_continues():
    """The last token's state is the whole sequence's: a cache from classifying a prefix, fed the
    rest, gives the whole sequence's logits."""
    model = tiny_head(OSDNForSequenceClassification, num_labels=3)
    (ids,) = sequences(12)
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :7], use_cache=True)
        rest = model(ids[:, 7:], cache=output_cache(first))
    torch.testing.assert_close(rest.logits, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_classification_and_question_answering_equal_each_sequence_alone(side):
    tagger = tiny_head(OSDNForTokenClassification, DEVICE, num_labels=5)
    reader = tiny_head(OSDNForQuestionAnswering, DEVICE)
    seqs = sequences(9, 5, device=DEVICE)
    ids, mask = padded(seqs, side)
    real = mask.bool()
    with torch.no_grad():
        tags = tagger(ids, attention_mask=mask).logits
        answers = reader(ids, attention_mask=mask)
        for row, s in enumerate(seqs):
            torch.testing.assert_close(tags[row][real[row]], tagger(s).logits[0], atol=1e-5, rtol=1e-5)
            alone = reader(s)
            torch.testing.assert_close(
                answers.start_logits[row][real[row]], alone.start_logits[0], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(answers.end_logits[row][real[row]], alone.end_logits[0], atol=1e-5, rtol=1e-5)

    lowest = torch.finfo(answers.start_logits.dtype).min  # no answer starts or ends in the padding
    assert (answers.start_logits[~real] == lowest).all() and (answers.end_logits[~real] == lowest).all()

    labels = torch.randint(0, 5, ids.shape, device=DEVICE).masked_fill(~real, -100)
    out = tagger(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[real], labels[real]))
    with pytest.raises(ValueError, match="must be \\[batch, seq_len\\]"):
        tagger(ids, attention_mask=mask, labels=labels[:, 1:])

    start, end = torch.tensor([1, 2], device=DEVICE), torch.tensor([3, 4], device=DEVICE)
    out = reader(ids, attention_mask=mask, start_positions=start, end_positions=end)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_token_classification_keeps_packed_sequences_apart():
    tagger = tiny_head(OSDNForTokenClassification, DEVICE, num_labels=5)
    seqs = sequences(9, 5, 7, device=DEVICE)
    with torch.no_grad():
        packed = tagger(torch.cat(seqs, 1), cu_seqlens=torch.tensor([0, 9, 14, 21], device=DEVICE)).logits
        alone = torch.cat([tagger(s).logits for s in seqs], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_heads_load_as_remote_code_without_the_package(tmp_path):
    heads = {auto.__name__: tiny_head(cls, num_labels=3) for auto, cls in HEADS}
    ids, mask = padded(sequences(9, 5), "left")
    reference = {}
    for name, head in heads.items():
        head.save_pretrained(tmp_path / name)
        with torch.no_grad():
            out = head(ids, attention_mask=mask)
        reference[name] = out.logits if "Question" not in name else out.start_logits
    torch.save({"ids": ids, "mask": mask, **reference}, tmp_path / "ref.pt")
    script = f"""
        import torch, transformers
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        for name in {sorted(heads)!r}:
            model = getattr(transformers, name).from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True)
            assert "osdn_hf" not in type(model).__module__, type(model).__module__
            with torch.no_grad():
                out = model(ref["ids"], attention_mask=ref["mask"])
            assert torch.equal(out.logits if "Question" not in name else out.start_logits, ref[name]), name
        print("remote heads ok")
        """
    assert "remote heads ok" in run_without_the_package(script, tmp_path)
