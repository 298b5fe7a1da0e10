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


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """(n_blocks, seq_len) int64 token ids."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


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
