"""Packing: documents or examples -> training rows of at most `block_size` tokens.

A row is a list of pieces, each a contiguous run of one document. Position ids restart at 0 where each piece
begins: that is the row's record of example boundaries. The collator and the model turn it into a
block-diagonal causal mask, so packed examples never attend to each other. The first token of every piece is
never a target (nothing in its own example precedes it), so a packed row gives exactly the losses of its
examples run one by one.

The plan is computed from document lengths alone (array arithmetic, no pass over tokens); the store
(store.py) assembles rows from it when they are read.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

IGNORE = -100


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


def plan_rows(doc_lengths: np.ndarray, block_size: int, fmt: str, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """The packing plan: (pieces as (start, length) pairs into the split's token stream, row offsets into them).

    text + packing: the stream cut every `block_size` tokens (a document crossing a cut continues in the next
    row as a new piece); text without packing: each document cut into pieces of at most `block_size`, one per
    row; other formats: whole examples, bin-packed best-fit-decreasing (packing) or one per row."""
    lengths = doc_lengths.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    if fmt == "text" and packing:
        bounds = np.union1d(starts[:-1], np.arange(0, total, block_size, dtype=np.int64))
        pieces = np.stack([bounds, np.diff(np.append(bounds, total))], axis=1)
        row_of_piece = bounds // block_size
        rows = np.searchsorted(row_of_piece, np.arange(int(row_of_piece[-1]) + 2 if total else 1), side="left")
        return pieces, rows.astype(np.int64)
    if fmt == "text":
        count = -(-lengths // block_size)  # pieces per document
        first = np.repeat(np.cumsum(count) - count, count)
        begin = np.repeat(starts[:-1], count) + (np.arange(int(count.sum())) - first) * block_size
        end = np.repeat(starts[1:], count)
        pieces = np.stack([begin, np.minimum(end - begin, block_size)], axis=1)
        return pieces, np.arange(len(pieces) + 1, dtype=np.int64)
    pieces = np.stack([starts[:-1], lengths], axis=1)
    if not packing:
        return pieces, np.arange(len(pieces) + 1, dtype=np.int64)
    bins = best_fit_decreasing(lengths.tolist(), block_size)
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(lengths))
    rows = np.concatenate([[0], np.cumsum([len(members) for members in bins])]).astype(np.int64)
    return pieces[order], rows
