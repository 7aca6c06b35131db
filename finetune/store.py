"""The prepared token store: one folder per split, read through memory maps.

    <split>/a-00000.tokens    token ids, uint16 when the vocabulary fits (uint32 otherwise)
    <split>/a-00000.docs      uint32 length of each document / example in the shard, in order
    <split>/a-00000.targets   uint8 1 = the token is a target (only formats with prompts have it)
    <split>/a-00000.records   normalized source records as JSON lines (only where eval needs them)
    <split>/a-00000.desirable uint8 per example: 1 = a desirable completion, 0 = an undesirable one (feedback data)
    <split>/plan.pieces           int64 (start, length) pairs: contiguous token runs of the split
    <split>/plan.rows             int64 offsets into the pieces: row i is pieces[rows[i]:rows[i + 1]]
    <split>/split.json            shard list with sizes and checksums, dtype, totals (written last)

Shards are named by the read that made them (a: data.train, b: data.validation) and their number in it.

Every piece is a run of one document, so a row's position ids restart at 0 where each piece begins and the
first token of each piece is never a target (see packing.py). Rows are assembled when read; nothing the size
of the corpus is ever held in memory.

Why raw numpy memmaps: the data is flat integer arrays read by offset, the layout nanoGPT made standard;
a row is a few slices of one mapped file, with no decoding and no per-row objects (Arrow would add a list
column's offsets for nothing, and its memory-mapped reads go through the same page cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import UserError
from finetune.packing import IGNORE, plan_pieces

SPLIT_FILE = "split.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def file_checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a reader sees the old file, the whole new one, or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class ShardData:
    """One shard's worth of a split, as written: token ids, document lengths, optional target flags and records
    (JSON lines), each a list of arrays (or byte strings) written one after the other, never concatenated."""

    tokens: list[np.ndarray]
    docs: list[np.ndarray]
    targets: list[np.ndarray] | None = None
    records: list[bytes] | None = None
    desirable: list[np.ndarray] | None = None


def write_parts(path: Path, parts: list) -> dict:
    """Write arrays / byte strings back to back to a temporary name, then rename; returns size and checksum."""
    digest, size = hashlib.blake2b(digest_size=16), 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        for part in parts:
            view = memoryview(np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part).cast("B")
            handle.write(view)
            digest.update(view)
            size += len(view)
    os.replace(tmp, path)
    return {"bytes": size, "checksum": digest.hexdigest()}


def write_shard(folder: Path, name: str, shard: ShardData) -> dict:
    """Write a shard's files (each atomically) and return its entry for split.json: sizes and checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"tokens": shard.tokens, "docs": [d.astype(np.uint32) for d in shard.docs]}
    if shard.targets is not None:
        files["targets"] = [t.astype(np.uint8) for t in shard.targets]
    if shard.records is not None:
        files["records"] = shard.records
    if shard.desirable is not None:
        files["desirable"] = [d.astype(np.uint8) for d in shard.desirable]
    written = {kind: write_parts(folder / f"{name}.{kind}", parts) for kind, parts in files.items()}
    return {"name": name, "tokens": sum(len(t) for t in shard.tokens), "docs": sum(len(d) for d in shard.docs),
            "files": written}


def check_shard(folder: Path, entry: dict, checksums: bool) -> str | None:
    """What is wrong with a written shard (missing or resized file, or with `checksums` changed bytes), or None."""
    for kind, expected in entry["files"].items():
        path = folder / f"{entry['name']}.{kind}"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if checksums and file_checksum(path) != expected["checksum"]:
            return f"{path} does not match its checksum (corrupted after it was written)"
    return None


def finish_split(folder: Path, shards: list[dict], dtype: np.dtype, block_size: int, stream: bool,
                 packing: bool, pairs: bool = False) -> dict:
    """Write the packing plan (shard by shard) and split.json (last, atomically); return split.json's content."""
    lengths = (np.fromfile(folder / f"{entry['name']}.docs", dtype=np.uint32) for entry in shards)
    firsts, count = [], 0
    tmp = folder / "plan.pieces.tmp"
    with tmp.open("wb") as handle:
        for pieces, row_firsts in plan_pieces(lengths, block_size, stream, packing, pairs):
            handle.write(memoryview(np.ascontiguousarray(pieces, dtype=np.int64)).cast("B"))
            firsts.append(row_firsts.astype(np.int64))
            count += len(pieces)
    os.replace(tmp, folder / "plan.pieces")
    rows = np.concatenate(firsts + [np.array([count], dtype=np.int64)])
    write_atomic(folder / "plan.rows", rows.tobytes())
    info = {"dtype": dtype.name, "tokens": sum(e["tokens"] for e in shards), "docs": sum(e["docs"] for e in shards),
            "rows": int(len(rows) - 1), "pieces": count, "block_size": block_size, "shards": shards,
            "plan": {name: (folder / name).stat().st_size for name in ("plan.pieces", "plan.rows")}}
    write_atomic(folder / SPLIT_FILE, json.dumps(info, indent=1).encode())
    return info


def split_problem(folder: Path, checksums: bool = False) -> str | None:
    """Why a split folder is not a complete store (None when it is): split.json, every shard file and the plan
    must be present at their written sizes; `checksums` also rereads every shard."""
    info_path = folder / SPLIT_FILE
    if not info_path.is_file():
        return f"{info_path} is missing"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{info_path} is unreadable: {exc}"
    for name, size in info["plan"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{path} is missing or truncated"
    for entry in info["shards"]:
        problem = check_shard(folder, entry, checksums)
        if problem:
            return problem
    return None


def store_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


class TokenStore:
    """A prepared split, read lazily: `store[i]` assembles row i (input_ids, labels, position_ids as int64
    arrays; for feedback data `desirable`, each piece's label) from its pieces. Memory maps open on first use, so
    the object pickles cheaply (DataLoader workers)."""

    def __init__(self, folder: Path) -> None:
        problem = split_problem(folder)
        if problem:
            raise UserError(f"prepared data is incomplete: {problem}; run 'finetune prepare' again")
        self.folder = folder
        self.info = json.loads((folder / SPLIT_FILE).read_text())
        self.dtype = np.dtype(self.info["dtype"])
        counts = [entry["tokens"] for entry in self.info["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: dict | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _open(self) -> dict:
        if self._maps is None:
            shards = self.info["shards"]
            maps = {"tokens": [], "targets": []}
            for entry in shards:
                maps["tokens"].append(self._map(f"{entry['name']}.tokens", self.dtype, entry["tokens"]))
                has_targets = "targets" in entry["files"]
                maps["targets"].append(self._map(f"{entry['name']}.targets", np.uint8, entry["tokens"])
                                       if has_targets else None)
            maps["pieces"] = self._map("plan.pieces", np.int64, self.info["pieces"] * 2).reshape(-1, 2)
            maps["rows"] = self._map("plan.rows", np.int64, self.info["rows"] + 1)
            if shards and "desirable" in shards[0]["files"]:
                maps["doc_starts"], maps["desirable"] = self._example_labels()
            self._maps = maps
        return self._maps

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.folder / name, dtype=dtype, mode="r", shape=(count,))

    def _example_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Feedback data: where each example starts in the split's token stream, and its label (one byte and one
        int64 per example, read once: example data sets are small)."""
        starts, labels = [], []
        for entry, begin in zip(self.info["shards"], self.shard_starts):
            lengths = np.fromfile(self.folder / f"{entry['name']}.docs", dtype=np.uint32).astype(np.int64)
            starts.append(begin + np.cumsum(lengths) - lengths)
            labels.append(np.fromfile(self.folder / f"{entry['name']}.desirable", dtype=np.uint8))
        return np.concatenate(starts), np.concatenate(labels).astype(bool)

    def __len__(self) -> int:
        return self.info["rows"]

    def _run(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (and target flags) of a run within one document, hence within one shard."""
        maps = self._open()
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        offset = start - int(self.shard_starts[shard])
        targets = maps["targets"][shard]
        return (maps["tokens"][shard][offset:offset + length],
                None if targets is None else targets[offset:offset + length])

    def row_pieces(self, index: int) -> np.ndarray:
        maps = self._open()
        if not 0 <= index < len(self):
            raise IndexError(index)
        return maps["pieces"][maps["rows"][index]:maps["rows"][index + 1]]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ids, labels, positions = [], [], []
        pieces = self.row_pieces(int(index))
        for start, length in pieces.tolist():
            piece, targets = self._run(start, length)
            piece = piece.astype(np.int64)
            label = piece.copy() if targets is None else np.where(targets.astype(bool), piece, IGNORE)
            label[0] = IGNORE
            ids.append(piece)
            labels.append(label)
            positions.append(np.arange(length, dtype=np.int64))
        row = {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels),
               "position_ids": np.concatenate(positions)}
        maps = self._open()
        if "desirable" in maps:  # a piece of an example is the whole example
            row["desirable"] = maps["desirable"][np.searchsorted(maps["doc_starts"], pieces[:, 0])]
        return row

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's token ids (int64), in order."""
        maps = self._open()
        for entry, tokens in zip(self.info["shards"], maps["tokens"]):
            if entry["docs"] == 0:
                continue
            lengths = np.fromfile(self.folder / f"{entry['name']}.docs", dtype=np.uint32).astype(np.int64)
            for begin, end in zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]), np.cumsum(lengths)):
                yield np.asarray(tokens[begin:end], dtype=np.int64)

    def records(self) -> list[dict]:
        out = []
        for entry in self.info["shards"]:
            if "records" not in entry["files"]:
                raise UserError(f"{self.folder} keeps no source records (only the validation split of non-text "
                                "data and the train split of classification data do)")
            with (self.folder / f"{entry['name']}.records").open(encoding="utf-8") as handle:
                out += [json.loads(line) for line in handle]
        return out
