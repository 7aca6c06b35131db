"""Raw rows -> token ids for the store: the work a prepare worker process does on one batch.

Kept light (no torch, no transformers) so that worker processes start fast. A worker's tokenizer runs on one
thread: the workers are the parallelism.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from finetune.data import RowBatch, RowRef, parse_row
from finetune.formats import data_format, encode_texts
from finetune.recipe import DataConfig

ROUTES = ("train", "validation")  # a row's route: the index of its split here, or SKIP
SKIP = len(ROUTES)  # a row this read of its source leaves out (see prepare.Read)


@dataclass
class EncodeContext:
    """What every batch of a prepare run is encoded with (pickled once into each worker)."""

    cfg: DataConfig  # the source's (finetune.sources.source_config)
    tokenizer_json: str
    eos_token_id: int
    dtype: str

    def __post_init__(self) -> None:
        self._encoder = None
        self.format = data_format(self.cfg)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from tokenizers import Tokenizer

            self._encoder = _Encoder(Tokenizer.from_str(self.tokenizer_json), self.eos_token_id)
        return self._encoder


@dataclass
class _Encoder:
    """The two attributes of a transformers tokenizer that formats.encode_segments uses."""

    backend_tokenizer: Any
    eos_token_id: int


@dataclass
class SplitPart:
    """One batch's contribution to one split: per kept example its token ids, unless every token is a target its
    target runs, (length, is_target) pairs covering the example's tokens, and for feedback data its label."""

    ids: list = field(default_factory=list)
    targets: list | None = None
    desirable: list | None = None
    records: list | None = None
    records_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def arrays(self, dtype: str) -> dict:
        lengths = np.fromiter((len(ids) for ids in self.ids), dtype=np.uint32, count=len(self.ids))
        flat = np.fromiter(chain.from_iterable(self.ids), dtype=dtype, count=int(lengths.sum()))
        targets = None
        if self.targets is not None:
            runs = np.array([run for runs in self.targets for run in runs], dtype=np.int64).reshape(-1, 2)
            targets = np.repeat(runs[:, 1].astype(np.uint8), runs[:, 0])
            targets[np.cumsum(lengths, dtype=np.int64) - lengths] = 0  # nothing precedes an example's first token
        records = None if self.records is None else "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in self.records).encode()
        desirable = None if self.desirable is None else np.array(self.desirable, dtype=np.uint8)
        return {"tokens": flat, "docs": lengths, "targets": targets, "records": records, "records_in": self.records_in,
                "dropped": self.dropped, "truncated": self.truncated, "desirable": desirable}


PARENT_CHECK_SECONDS = 0.5


def init_worker(context: EncodeContext, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _CONTEXT
    _CONTEXT = context
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """A prepare killed outright (SIGKILL, the OOM killer) cannot stop its workers: each leaves on its own within
    PARENT_CHECK_SECONDS of its parent's death (it is then re-parented), instead of living on for good."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


_CONTEXT: EncodeContext | None = None


def encode_in_worker(job: tuple[RowBatch, np.ndarray]) -> dict[str, dict]:
    return encode_batch(_CONTEXT, *job)


def encode_batch(context: EncodeContext, batch: RowBatch, routes: np.ndarray) -> dict[str, dict]:
    """Normalize, tokenize, truncate or drop one batch's rows; send each to the split `routes` names for it
    (leaving out those routed to SKIP)."""
    fmt = context.format
    parts: dict[str, SplitPart] = {}
    kept: list[tuple[str, dict]] = []
    for i, raw in enumerate(batch.rows):
        if routes[i] == SKIP:
            continue
        split = ROUTES[routes[i]]
        part = parts.setdefault(split, SplitPart(targets=None if fmt.every_token_target else [],
                                                 records=[] if split in fmt.record_splits else None,
                                                 desirable=[] if fmt.unpaired else None))
        part.records_in += 1
        where = RowRef(batch.source, batch.start + i, batch.line(i))
        record, reason = fmt.normalize(parse_row(raw, where), where)
        if record is None:
            part.dropped[reason] += 1
        else:
            kept.append((split, record))
    if fmt.every_token_target:
        _encode_documents(context, kept, parts)
    elif fmt.paired:
        _encode_pairs(context, kept, parts)
    elif fmt.unpaired:
        _encode_feedback(context, kept, parts)
    elif fmt.prompts_only:
        _encode_prompts(context, kept, parts)
    else:
        _encode_examples(context, kept, parts)
    return {split: part.arrays(context.dtype) for split, part in parts.items()}


def _tokenized(context: EncodeContext, kept: list[tuple[str, dict]]
               ) -> Iterator[tuple[str, dict, list[tuple[list[int], bool]]]]:
    """Each kept record with its segments as (token ids, is_target), the batch's texts tokenized in one call."""
    all_segments = [context.format.segments(record) for _, record in kept]
    texts = [text for segs in all_segments for text, _ in segs if text is not None]
    pieces = iter(encode_texts(context.encoder, texts))
    eos = [context.eos_token_id]
    for (split, record), segs in zip(kept, all_segments):
        yield split, record, [(eos if text is None else next(pieces), target) for text, target in segs]


def _encode_documents(context: EncodeContext, kept: list[tuple[str, dict]], parts: dict[str, SplitPart]) -> None:
    """Documents: all their tokens, all of them targets (no mask is stored); packing cuts a long one into rows."""
    for split, record, pieces in _tokenized(context, kept):
        part = parts[split]
        part.ids.append(list(chain.from_iterable(piece for piece, _ in pieces)))
        if part.records is not None:
            part.records.append(record)


def _encode_examples(context: EncodeContext, kept: list[tuple[str, dict]], parts: dict[str, SplitPart]) -> None:
    """Examples: targets only where the format says; examples over the block truncated or dropped. Segment by
    segment, so no Python work is done per token."""
    cfg = context.cfg
    block = cfg.block_size
    for split, record, pieces in _tokenized(context, kept):
        part = parts[split]
        ids, runs, total, has_target = [], [], 0, False
        for piece, target in pieces:
            take = max(min(len(piece), block - total), 0)
            if take:
                ids += piece[:take]
                runs.append((take, target))
                has_target |= target and total + take > 1  # an example's first token is never a target
            total += len(piece)
        truncated = total > block
        reason = ""
        if truncated and cfg.overflow == "drop":
            reason = "too_long"
        elif not has_target:
            reason = "no_target_after_truncation" if truncated else "no_target"
        if reason:
            part.dropped[reason] += 1
            continue
        part.truncated += truncated
        part.ids.append(ids)
        part.targets.append(runs)
        if part.records is not None:
            part.records.append(record)


def _encode_prompts(context: EncodeContext, kept: list[tuple[str, dict]], parts: dict[str, SplitPart]) -> None:
    """Prompts (reward RL): whole, no token a target; one longer than the block is dropped, not cut (the
    completion continues its end)."""
    for split, record, pieces in _tokenized(context, kept):
        part = parts[split]
        ids = list(chain.from_iterable(piece for piece, _ in pieces))
        if len(ids) > context.cfg.block_size:
            part.dropped["prompt_too_long"] += 1
            continue
        part.ids.append(ids)
        part.targets.append([(len(ids), False)])
        part.records.append(record)


def _flat(pieces: list[tuple[list[int], bool]]) -> tuple[list[int], list[tuple[int, bool]]]:
    """Segments' token ids, concatenated, and their target runs."""
    return list(chain.from_iterable(ids for ids, _ in pieces)), [(len(ids), target) for ids, target in pieces if ids]


def _cut_runs(runs: list[tuple[int, bool]], length: int) -> list[tuple[int, bool]]:
    """Target runs of the first `length` tokens."""
    out = []
    for size, target in runs:
        if length <= 0:
            break
        out.append((min(size, length), target))
        length -= size
    return out


def _encode_pairs(context: EncodeContext, kept: list[tuple[str, dict]], parts: dict[str, SplitPart]) -> None:
    """Pairs: prompt + chosen and prompt + rejected, adjacent, each at most half a block (the two share a row).
    A prompt is cut from the left to `data.preference.max_prompt_tokens` (default a quarter of the block), then
    both responses from the right to what is left: the same rule for both sides. Dropped and counted: a prompt
    that fills the sequence, responses identical after the cut."""
    cfg = context.cfg
    half = cfg.block_size // 2
    max_prompt = cfg.preference.max_prompt_tokens or half // 2
    segments = [context.format.pair_segments(record) for _, record in kept]
    texts = [text for pair in segments for segs in pair for text, _ in segs if text is not None]
    pieces = iter(encode_texts(context.encoder, texts))
    eos = [context.eos_token_id]
    for (split, record), pair in zip(kept, segments):
        part = parts[split]
        (prompt, _), *responses = [_flat([(eos if text is None else next(pieces), target) for text, target in segs])
                                   for segs in pair]
        prompt, truncated, room = _cut_prompt(prompt, max_prompt, half)
        if room < 1:
            part.dropped["prompt_fills_block"] += 1
            continue
        truncated |= any(len(ids) > room for ids, _ in responses)
        responses = [(ids[:room], _cut_runs(runs, room)) for ids, runs in responses]
        if responses[0][0] == responses[1][0]:
            part.dropped["identical_after_truncation"] += 1
            continue
        part.truncated += truncated
        for ids, runs in responses:
            part.ids.append(prompt + ids)
            part.targets.append([(len(prompt), False), *runs])
        if part.records is not None:
            part.records.append(record)


def _cut_prompt(prompt: list[int], max_prompt: int, budget: int) -> tuple[list[int], bool, int]:
    """The rule pairs and rated completions share: a prompt over `max_prompt` tokens keeps its end; (the prompt,
    whether it was cut, the room left for a response in a sequence of `budget` tokens)."""
    truncated = len(prompt) > max_prompt
    prompt = prompt[len(prompt) - max_prompt:] if truncated else prompt
    return prompt, truncated, budget - len(prompt)


def _encode_feedback(context: EncodeContext, kept: list[tuple[str, dict]], parts: dict[str, SplitPart]) -> None:
    """Rated completions: prompt + completion, one sequence of at most a block, stored with its label. A prompt is
    cut from the left to `data.feedback.max_prompt_tokens` (default half the block), then the completion from the
    right to what is left, as for pairs. Dropped and counted: a prompt that fills the block."""
    cfg = context.cfg
    block = cfg.block_size
    max_prompt = cfg.feedback.max_prompt_tokens or block // 2
    segments = [(context.format.prompt_segments(record), context.format.completion_segments(record))
                for _, record in kept]
    texts = [text for both in segments for segs in both for text, _ in segs if text is not None]
    pieces = iter(encode_texts(context.encoder, texts))
    eos = [context.eos_token_id]
    for (split, record), both in zip(kept, segments):
        part = parts[split]
        (prompt, _), (completion, runs) = [_flat([(eos if text is None else next(pieces), target)
                                                  for text, target in segs]) for segs in both]
        prompt, truncated, room = _cut_prompt(prompt, max_prompt, block)
        if room < 1:
            part.dropped["prompt_fills_block"] += 1
            continue
        truncated |= len(completion) > room
        part.truncated += truncated
        part.ids.append(prompt + completion[:room])
        part.targets.append([(len(prompt), False), *_cut_runs(runs, room)])
        part.desirable.append(record["label"])
        if part.records is not None:
            part.records.append(record)
