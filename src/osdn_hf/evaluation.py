"""Perplexity of a causal LM on a local text, with OSDN's recurrent state carried across blocks."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .modeling_osdn import output_cache


@torch.no_grad()
def perplexity(model, tokenizer, text: str, block_size: int = 2048, carry_state: bool = True) -> dict:
    """Token-level perplexity of `text`.

    With `carry_state` the text is read in blocks of `block_size` tokens, each continuing from
    the recurrent cache the last one left, so every token but the first is scored with the
    whole text before it, in memory that does not grow with the text. Without it, blocks are
    scored independently (the first token of each block is not scored).
    """
    if block_size < 2:
        raise ValueError(f"`block_size` must be at least 2, got {block_size}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"the text has {ids.shape[1]} tokens; perplexity needs at least 2")
    model.eval()
    nll, scored, cache, prev_logit = 0.0, 0, None, None
    for start in tqdm(range(0, ids.shape[1], block_size), desc="perplexity", leave=False):
        block = ids[:, start : start + block_size]
        out = model(block, past_key_values=cache, use_cache=carry_state)
        logits = out.logits.float()
        if carry_state and prev_logit is not None:
            logits = torch.cat([prev_logit, logits], dim=1)
            targets = block
        else:
            targets = block[:, 1:]
        logits = logits[:, : targets.shape[1]]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        scored += targets.numel()
        if carry_state:
            cache, prev_logit = output_cache(out), out.logits[:, -1:].float()
    return {
        "tokens": int(ids.shape[1]),
        "scored_tokens": scored,
        "nll": nll / scored,
        "perplexity": math.exp(nll / scored),
    }
