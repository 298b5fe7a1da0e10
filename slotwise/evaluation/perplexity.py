"""Held-out perplexity: documents joined with EOS, cut into fixed blocks, exp(mean next-token NLL).

    ppl = heldout_perplexity(model, tokenizer, texts, seq_len=256, max_blocks=64)
    ppl["perplexity"], ppl["tokens"]      # tokens = blocks * (seq_len - 1) predicted tokens
    perplexity(model, token_blocks(tokenizer, texts, 128, 8), batch_size=4)   # the number alone

Every block is scored on its own (no context carried across blocks); the first token of each block
is context only.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def token_blocks(tokenizer, texts: Iterable[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """(n_blocks, seq_len) token ids of the documents joined with EOS; the ragged tail is dropped."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to join documents with")
    need = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [eos]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len if max_blocks is None else min(len(ids) // seq_len, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def blocks_nll(model, blocks: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> tuple[float, int]:
    """(summed next-token NLL, number of predicted tokens) over the blocks."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=progress, disable=progress is None):
        batch = blocks[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()  # (B, S-1, V)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total, count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> float:
    """exp(mean next-token NLL) over blocks (n_blocks, seq_len); every slotwise perplexity is this one."""
    total, count = blocks_nll(model, blocks, batch_size, progress)
    return math.exp(total / count)


def heldout_perplexity(model, tokenizer, texts: Iterable[str], seq_len: int = 256, max_blocks: int | None = None,
                       batch_size: int = 8, progress: str | None = None, blocks: torch.Tensor | None = None) -> dict:
    """{"perplexity", "nll", "tokens", "blocks"}; raises ValueError when the text is shorter than one block."""
    if blocks is None:
        blocks = token_blocks(tokenizer, texts, seq_len, max_blocks)
    if len(blocks) == 0:
        raise ValueError(f"held-out text is shorter than one block of {seq_len} tokens")
    total, count = blocks_nll(model, blocks, batch_size, progress)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "blocks": len(blocks)}
