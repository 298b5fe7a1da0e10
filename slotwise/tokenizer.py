"""A small byte-level BPE tokenizer trained on the pretraining text (pretrain mode only).

    tok = train_bpe(texts, vocab_size=8192)      # a transformers fast tokenizer; save_pretrained works

Why: a model pretrained from scratch on CPU with SmolLM2's 49,152-token vocabulary spends most of
each step in the output layer (d 256: the LM head and its softmax are ~60% of a step's time); a
vocabulary fitted to the corpus makes that ~6x smaller. Byte-level, so any text (new people's
names included) tokenizes, with the leading space inside a word's token as in GPT-2 and SmolLM2.
Deterministic: the same texts give the same vocabulary.
"""
from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """-> a PreTrainedTokenizerFast with EOS (also BOS) `<|endoftext|>`; offsets keep leading spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + EOS + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, clean_up_tokenization_spaces=False)
