"""Tokenizers: load one (a Hub id or a folder), or train a byte-level BPE on the data; EOS doubles as padding.

Kept apart from modeling.py so that `prepare` loads no model code.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from finetune.errors import UserError
from finetune.long_texts import pieces
from finetune.recipe import Recipe, TokenizerTrainConfig

EOS_TOKEN = "<|endoftext|>"


def with_pad_token(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """GPT-2 has no pad token: reuse EOS for padding. Labels never come from pad ids (the collator pads labels
    with -100 by length), so the model still learns to emit EOS."""
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-text token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerFast:
    folder = Path(path)
    try:
        if folder.is_dir() and not (folder / "tokenizer_config.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = GPT2TokenizerFast.from_pretrained(path)  # bare GPT-2 files: vocab.json + merges.txt
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as exc:  # noqa: BLE001 - a missing folder, an unreachable Hub id, a broken file
        raise UserError(f"could not load tokenizer {path!r}: {type(exc).__name__}: {exc}") from None
    if not tokenizer.is_fast:
        raise UserError(f"tokenizer {path!r} has no fast (Rust) implementation; gpt2-finetune needs one")
    return with_pad_token(tokenizer)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerTrainConfig) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, with `<|endoftext|>` as EOS/BOS/UNK."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    # long texts in pieces: the same words are counted (long_texts.py), with bounded memory
    bpe.train_from_iterator(chain.from_iterable(map(pieces, texts)), vocab_size=cfg.vocab_size,
                            min_frequency=cfg.min_frequency, special_tokens=[EOS_TOKEN], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                        unk_token=EOS_TOKEN, model_max_length=1_000_000)
    return with_pad_token(tokenizer)


def tokenizer_source(recipe: Recipe) -> str | None:
    """Where the recipe's tokenizer is loaded from; None when it is trained on the data."""
    if recipe.tokenizer.train is not None:
        return None
    return recipe.tokenizer.path or recipe.model.base
