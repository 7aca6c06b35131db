"""Token examples -> training rows of at most `block_size` tokens.

Every row carries `position_ids` that restart at 0 where an example (or a piece of one) begins: that is the
row's record of example boundaries. The collator and the model turn it into a block-diagonal causal mask, so
packed examples never attend to each other. The first token of every piece is never a target (nothing in its
own example precedes it), so a packed row gives exactly the losses of its examples run one by one.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from itertools import chain

import numpy as np

IGNORE = -100
Example = tuple[list[int], list[int]]  # (input_ids, labels)
Rows = dict[str, list[list[int]]]


def pack_stream(examples: list[Example], block_size: int) -> Rows:
    """Concatenate documents and cut the stream every `block_size` tokens (the last row may be shorter)."""
    lengths = np.fromiter((len(ids) for ids, _ in examples), dtype=np.int64, count=len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in examples), dtype=np.int64, count=total)
    labels = np.fromiter(chain.from_iterable(lab for _, lab in examples), dtype=np.int64, count=total)
    index = np.arange(total)
    doc_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    piece_start = np.maximum(doc_start, index - index % block_size)
    positions = index - piece_start
    labels[positions == 0] = IGNORE
    cuts = np.arange(block_size, total, block_size)
    return {
        "input_ids": [a.tolist() for a in np.split(ids, cuts)],
        "labels": [a.tolist() for a in np.split(labels, cuts)],
        "position_ids": [a.tolist() for a in np.split(positions, cuts)],
    }


def split_long(examples: list[Example], block_size: int) -> list[Example]:
    """Cut documents longer than `block_size` into pieces (text format without packing)."""
    out = []
    for ids, labels in examples:
        for start in range(0, len(ids), block_size):
            piece_labels = list(labels[start:start + block_size])
            piece_labels[0] = IGNORE
            out.append((ids[start:start + block_size], piece_labels))
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items longest first, each into the fullest bin it still fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[item]
        slot = bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([item])
            insort(free, (capacity - size, len(bins) - 1))
        else:
            remaining, bin_index = free.pop(slot)
            bins[bin_index].append(item)
            insort(free, (remaining - size, bin_index))
    return bins


def pack_examples(examples: list[Example], block_size: int) -> Rows:
    """Whole examples bin-packed into rows; each example keeps its own positions 0..n-1."""
    bins = best_fit_decreasing([len(ids) for ids, _ in examples], block_size)
    return _rows([[examples[i] for i in members] for members in bins])


def one_per_row(examples: list[Example]) -> Rows:
    return _rows([[example] for example in examples])


def _rows(groups: list[list[Example]]) -> Rows:
    positions = [list(range(n)) for n in range(max((len(ids) for g in groups for ids, _ in g), default=0) + 1)]
    return {
        "input_ids": [list(chain.from_iterable(ids for ids, _ in group)) for group in groups],
        "labels": [list(chain.from_iterable(labels for _, labels in group)) for group in groups],
        "position_ids": [list(chain.from_iterable(positions[len(ids)] for ids, _ in group)) for group in groups],
    }
