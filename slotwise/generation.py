"""Batched greedy generation for short answers (probes of facts, QA retention checks)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slotwise.qa_metrics import first_line


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 12, batch_size: int = 16,
                   progress: str | None = None) -> list[str]:
    """Greedy continuations of each prompt, cut at the first newline. Left padding keeps batches exact."""
    device = next(model.parameters()).device
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(gen[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            out += [first_line(t) for t in texts]
    finally:
        tokenizer.padding_side = pad_side
    return out
