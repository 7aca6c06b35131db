"""Packing: documents or examples -> training rows of at most `block_size` tokens.

A row is a list of pieces, each a contiguous run of one document. Position ids restart at 0 where each piece
begins: that is the row's record of example boundaries. The collator and the model turn it into a
block-diagonal causal mask, so packed examples never attend to each other. The first token of every piece is
never a target (nothing in its own example precedes it), so a packed row gives exactly the losses of its
examples run one by one.

The plan is computed from document lengths alone, shard by shard (array arithmetic, no pass over tokens, memory
bounded by a shard); the store (store.py) assembles rows from it when they are read.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator

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


def plan_pieces(shard_lengths: Iterable[np.ndarray], block_size: int, stream: bool, packing: bool,
                pairs: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The packing plan, shard by shard: for each shard's document lengths, its pieces as (start, length) pairs
    into the split's token stream and the (split-wide) indices of the pieces that begin a row.

    `stream` (documents, every token a target) + packing: the stream cut every `block_size` tokens (a document
    crossing a cut continues in the next row as a new piece); `stream` without packing: each document cut into
    pieces of at most `block_size`, one per row; examples: whole, one per row, or bin-packed best-fit-decreasing
    over the whole split (the one case that holds all lengths at once: example data sets are small). With
    `pairs`, examples come in adjacent twos (a preference pair's chosen and rejected sequences), placed as a unit:
    a row holds whole pairs, chosen before rejected."""
    group = 2 if pairs else 1
    if not stream and packing:
        lengths = np.concatenate([np.zeros(0, np.int64), *[np.asarray(x, np.int64) for x in shard_lengths]])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        bins = best_fit_decreasing(lengths.reshape(-1, group).sum(1).tolist(), block_size)
        order = np.fromiter((unit * group + k for members in bins for unit in members for k in range(group)),
                            dtype=np.int64, count=len(lengths))
        firsts = np.cumsum([0] + [group * len(members) for members in bins[:-1]]).astype(np.int64) if bins \
            else order[:0]
        yield np.stack([starts[order], lengths[order]], axis=1), firsts
        return
    base, pieces_before, last_row = 0, 0, -1
    for lengths in shard_lengths:
        lengths = np.asarray(lengths, dtype=np.int64)
        if not len(lengths):
            continue
        starts = base + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        end = base + int(lengths.sum())
        if stream and packing:
            bounds = np.union1d(starts, np.arange(-(-base // block_size) * block_size, end, block_size))
            pieces = np.stack([bounds, np.diff(np.append(bounds, end))], axis=1)
            rows = bounds // block_size
            firsts = np.flatnonzero(np.diff(np.concatenate([[last_row], rows])))
            last_row = int(rows[-1])
        else:
            if stream:
                count = -(-lengths // block_size)  # pieces per document
                within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
                begin = np.repeat(starts, count) + within * block_size
                pieces = np.stack([begin, np.minimum(np.repeat(starts + lengths, count) - begin, block_size)], axis=1)
            else:
                pieces = np.stack([starts, lengths], axis=1)
            firsts = np.arange(0, len(pieces), 1 if stream else group)
        yield pieces, pieces_before + firsts
        pieces_before += len(pieces)
        base = end
