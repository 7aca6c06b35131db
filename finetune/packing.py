"""Token examples -> training rows of at most `block_size` tokens.

Every row carries `position_ids` that restart at 0 where an example (or a piece of one) begins: that is the
row's record of example boundaries. The collator and the model turn it into a block-diagonal causal mask, so
packed examples never attend to each other. The first token of every piece is never a target (nothing in its
own example precedes it), so a packed row gives exactly the losses of its examples run one by one.

Sequences are kept flat (one array of all tokens plus offsets), so packing is array arithmetic, not a loop
over tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

IGNORE = -100


@dataclass
class Flat:
    """Many token sequences stored flat: sequence i is `ids[offsets[i]:offsets[i + 1]]` (labels alike)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    positions: np.ndarray | None = None

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[int]]]) -> Flat:
        lengths = [len(ids) for ids, _ in examples]
        return cls(np.array([t for ids, _ in examples for t in ids], dtype=np.int64),
                   np.array([t for _, labels in examples for t in labels], dtype=np.int64),
                   np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    @classmethod
    def from_arrow(cls, ids: pa.ListArray, labels: pa.ListArray) -> Flat:
        lengths = ids.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                   labels.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                   np.concatenate([[0], np.cumsum(lengths)]))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def to_arrow(self) -> pa.Table:
        offsets = pa.array(self.offsets, type=pa.int32())
        columns = {"input_ids": self.ids, "labels": self.labels, "position_ids": self.positions}
        return pa.table({name: pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int64()))
                         for name, values in columns.items()})

    def rows(self) -> list[dict[str, list[int]]]:
        bounds = list(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()))
        columns = {"input_ids": self.ids.tolist(), "labels": self.labels.tolist(), "position_ids": self.positions.tolist()}
        return [{name: values[a:b] for name, values in columns.items()} for a, b in bounds]


def _starts(flat: Flat) -> np.ndarray:
    """For each token, where its sequence starts."""
    return np.repeat(flat.offsets[:-1], flat.lengths)


def _with_positions(ids: np.ndarray, labels: np.ndarray, positions: np.ndarray, offsets: np.ndarray) -> Flat:
    labels = labels.copy()
    labels[positions == 0] = IGNORE
    return Flat(ids, labels, offsets, positions)


def pack_stream(docs: Flat, block_size: int) -> Flat:
    """Concatenate documents and cut the stream every `block_size` tokens (the last row may be shorter)."""
    index = np.arange(len(docs.ids))
    positions = index - np.maximum(_starts(docs), index - index % block_size)
    offsets = np.append(np.arange(0, len(index), block_size), len(index))
    return _with_positions(docs.ids, docs.labels, positions, offsets)


def split_long(docs: Flat, block_size: int) -> Flat:
    """Cut documents longer than `block_size` into pieces, one piece a row (text format without packing)."""
    positions = (np.arange(len(docs.ids)) - _starts(docs)) % block_size
    offsets = np.append(np.flatnonzero(positions == 0), len(docs.ids))
    return _with_positions(docs.ids, docs.labels, positions, offsets)


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


def pack_examples(examples: Flat, block_size: int) -> Flat:
    """Whole examples bin-packed into rows; each example keeps its own positions 0..n-1."""
    lengths = examples.lengths
    bins = best_fit_decreasing(lengths.tolist(), block_size)
    order = np.fromiter((i for members in bins for i in members), dtype=np.int64, count=len(examples))
    sizes = lengths[order]
    begin = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    positions = np.arange(int(sizes.sum())) - np.repeat(begin, sizes)
    gather = np.repeat(examples.offsets[:-1][order], sizes) + positions
    members = np.array([len(b) for b in bins], dtype=np.int64)
    row_sizes = np.add.reduceat(sizes, np.concatenate([[0], np.cumsum(members)[:-1]]))
    offsets = np.concatenate([[0], np.cumsum(row_sizes)])
    return _with_positions(examples.ids[gather], examples.labels[gather], positions, offsets)


def one_per_row(examples: Flat) -> Flat:
    positions = np.arange(len(examples.ids)) - _starts(examples)
    return _with_positions(examples.ids, examples.labels, positions, examples.offsets)
