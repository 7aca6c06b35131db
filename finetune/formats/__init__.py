"""Data formats, registered by name (the values of `data.format`): one module and one `DataFormat` class each,
owning everything that differs between formats (see base.py). Adding a format is its module and one entry in
FORMATS (and, when it has settings, its section in recipe.py's DataConfig).

Also here: tokenizing segments, the one way training, eval and generation turn them into token ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.formats.base import DataFormat, Message, Segment
from finetune.formats.chat import Chat
from finetune.formats.classification import Classification
from finetune.formats.feedback import Feedback
from finetune.formats.instruction import Instruction
from finetune.formats.preference import Preference
from finetune.formats.prompt import Prompt
from finetune.formats.text import Text
from finetune.long_texts import TokenIds, encode_bounded

if TYPE_CHECKING:  # for annotations only: recipe.py imports the formats
    from finetune.recipe import DataConfig

__all__ = ["FORMATS", "DataFormat", "Message", "Segment", "data_format", "encode_segments", "encode_texts"]

FORMATS: dict[str, type[DataFormat]] = {fmt.name: fmt for fmt in (Text, Instruction, Chat, Classification, Preference,
                                                                   Feedback, Prompt)}


def data_format(data: DataConfig) -> DataFormat:
    """The format object of `data.format` (checked against FORMATS when the recipe was loaded)."""
    return FORMATS[data.format](data)


def encode_texts(tokenizer: Any, texts: list[str]) -> list[TokenIds]:
    """Token ids of plain texts, straight from the Rust tokenizer (no special tokens added, and special-token
    strings inside the data, such as a literal "<|endoftext|>", encoded as ordinary text)."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return encode_bounded(backend, texts)
    finally:
        backend.encode_special_tokens = previous


def encode_segments(tokenizer: Any, batch: list[list[Segment]], ignore: int = -100
                    ) -> list[tuple[list[int], list[int]]]:
    """Tokenize many segment lists with one batched tokenizer call.

    Returns (token ids, labels) per segment list: labels repeat the ids on target segments, `ignore` elsewhere.
    """
    pieces = iter(encode_texts(tokenizer, [text for segs in batch for text, _ in segs if text is not None]))
    eos = [tokenizer.eos_token_id]
    out = []
    for segs in batch:
        ids: list[int] = []
        labels: list[int] = []
        for text, target in segs:
            piece = eos if text is None else next(pieces)
            ids += piece
            labels += piece if target else [ignore] * len(piece)
        out.append((ids, labels))
    return out
