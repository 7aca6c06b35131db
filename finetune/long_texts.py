r"""Token ids of texts of any length, with the tokenizer's memory bounded.

One call of the Rust tokenizer keeps, per character of its input, an alignment and, per token, its string and
offsets: about 120 bytes a character (one 50 MB record took 5.6 GB). A long text is therefore cut into pieces of
PIECE_CHARS characters or a little more, where the tokenizer splits the text anyway, and encoded at most
CALL_CHARS characters a call: the ids are exactly those of the whole text. Tokenizer training (tokenizer.py) is
fed the same pieces and counts the same pre-tokens.

Why the cuts change nothing, for a byte-level BPE like GPT-2's (`cuts_keep_ids` checks that it is one): its
pre-tokenizer splits the text with the regex
    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
and the model encodes each pre-token alone. A cut goes before a space, tab, newline or carriage return whose
preceding character is not whitespace. Every alternative that covers a non-whitespace character ends before
any whitespace, so a pre-token ends at the cut; none of the pre-tokens before it looks further than the cut's
character, which ends them alike at the end of the first piece; and no alternative looks behind, so the second
piece splits as the rest of the whole text did. Python's whitespace (`\S` below) includes all of the regex's.
Added tokens are matched before the regex runs: one without whitespace that ignores its neighbours never spans
a cut. Other tokenizers (with a normalizer, another pre-tokenizer, or another kind of added token) get their
texts whole, and so does a stretch of text with no cut in it.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterator, MutableSequence
from typing import Any

TokenIds = MutableSequence[int]  # a list, or for texts encoded in pieces an array("I"): 4 bytes a token, not 36
CUT = re.compile(r"(?<=\S)[ \t\n\r]")
PIECE_CHARS = 1 << 16  # a longer text is cut into pieces of at least this many characters
CALL_CHARS = 1 << 20  # characters per tokenizer call, at most (unless one piece has more)


def encode_bounded(backend: Any, texts: list[str]) -> list[TokenIds]:
    """The ids of `texts` that `backend.encode_batch_fast(texts, add_special_tokens=False)` gives, computed with
    calls of at most about CALL_CHARS characters where the tokenizer allows it."""
    if max(map(len, texts), default=0) <= PIECE_CHARS or not cuts_keep_ids(backend):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    ids = [array("I") for _ in texts]
    for call in _calls(texts):
        owners, pieces_of_call = zip(*call)
        for owner, encoding in zip(owners, backend.encode_batch_fast(list(pieces_of_call), add_special_tokens=False)):
            ids[owner].extend(encoding.ids)
    return ids


def cuts_keep_ids(backend: Any) -> bool:
    """Whether `backend` (a tokenizers.Tokenizer) gives a text cut at CUT the ids of the whole text."""
    from tokenizers.pre_tokenizers import ByteLevel

    pre = backend.pre_tokenizer
    return (backend.normalizer is None and isinstance(pre, ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and not any(token.lstrip or token.rstrip or token.single_word or any(c.isspace() for c in token.content)
                        for token in backend.get_added_tokens_decoder().values()))


def pieces(text: str) -> Iterator[str]:
    """`text` cut at CUT into pieces of at least PIECE_CHARS characters (but the last)."""
    start = 0
    while len(text) - start > PIECE_CHARS and (cut := CUT.search(text, start + PIECE_CHARS)):
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _calls(texts: list[str]) -> Iterator[list[tuple[int, str]]]:
    """(text index, piece) pairs, grouped into calls of at most CALL_CHARS characters (or one piece)."""
    call: list[tuple[int, str]] = []
    size = 0
    for owner, text in enumerate(texts):
        for piece in pieces(text):
            if call and size + len(piece) > CALL_CHARS:
                yield call
                call, size = [], 0
            call.append((owner, piece))
            size += len(piece)
    if call:
        yield call
