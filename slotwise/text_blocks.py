"""Documents -> fixed-length token blocks, in a seeded order that depends only on (seed, step).

Packing: documents are tokenized, joined with EOS and cut into blocks of seq_len tokens (the
tail that does not fill a block is dropped). The order of blocks in epoch e is a permutation
seeded by (seed, e), so the batch at any step can be recomputed after a restart without saving
a sampler state: that is what makes resumed training reach the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from slotwise.sources import read_jsonl


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    texts = [rec["text"] for _, rec in read_jsonl(path, ("text",))]
    return texts[:limit] if limit is not None else texts


def pack_blocks(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """(n_blocks, seq_len) int64 token ids; refuses text shorter than one block."""
    from slotwise.evaluation.perplexity import token_blocks

    blocks = token_blocks(tokenizer, texts, seq_len, max_blocks)
    if len(blocks) == 0:
        raise ValueError(f"the text is shorter than one block of seq_len={seq_len} tokens")
    return blocks


class BlockSchedule:
    """Batch b of the run = blocks[perm_e[i * bs:(i + 1) * bs]] with e, i from b; epochs reshuffle."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if len(blocks) < batch_size:
            raise ValueError(f"{len(blocks)} blocks are fewer than one batch of {batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.per_epoch = len(blocks) // batch_size

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.blocks), generator=g)
        return self.blocks[perm[i * self.batch_size:(i + 1) * self.batch_size]]

    def epochs(self, steps: int) -> float:
        return steps / self.per_epoch


def fixed_batches(blocks: torch.Tensor, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """Consecutive, unshuffled batches (evaluation and statistics)."""
    batches = [blocks[i:i + batch_size] for i in range(0, len(blocks) - batch_size + 1, batch_size)]
    return batches[:max_batches] if max_batches is not None else batches


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))


def lm_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed blocks: every token is a target (HF shifts labels inside the model)."""
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}


def prompt_answer_examples(pairs: list[tuple[str, str]], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) -> (input ids, labels) with the loss on the answer (+ EOS) only."""
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[:max_len]
        labels = ([-100] * len(p) + a)[:max_len]
        if any(t != -100 for t in labels):
            out.append((ids, labels))
    return out


def pad_examples(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    n = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, (x, y) in enumerate(examples):
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ExampleSchedule:
    """Like BlockSchedule, for variable-length examples: batch at step = f(seed, step)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.per_epoch = len(examples) // batch_size

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, self.per_epoch)
        perm = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return pad_examples([self.examples[j] for j in perm[i * self.batch_size:(i + 1) * self.batch_size]], self.pad_id)
