"""Write a hub-ready OSDN folder: weights, config with `auto_map`, modelling code, tokenizer, card."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

CARD_FIELDS = ("license:", "library_name:", "pipeline_tag:", "tags:")


def check_card(card: str) -> None:
    """A model card must open with YAML metadata holding the fields the hub indexes."""
    if not card.startswith("---\n") or "\n---\n" not in card[4:]:
        raise ValueError("the model card must start with a YAML block between '---' lines")
    meta = card[4 : card.index("\n---\n", 4)]
    missing = [f for f in CARD_FIELDS if f not in meta]
    if missing:
        raise ValueError(f"the model card's YAML lacks {missing}")


def export_for_hub(
    model_dir: str | Path,
    out_dir: str | Path,
    card: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Load `model_dir` and write everything `from_pretrained(..., trust_remote_code=True)` needs to `out_dir`."""
    card_text = Path(card).read_text(encoding="utf-8")
    check_card(card_text)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=max_shard_size)  # weights, config + auto_map, code
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card_text, encoding="utf-8")
    return out
