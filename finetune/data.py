"""Read records from local files or the Hub as a stream of batches, with bounded memory whatever the size.

Local .txt and .jsonl files (the formats of large corpora) are read in blocks of bytes; a JSONL line is parsed
where it is processed (in a prepare worker), so reading costs the main process little more than finding line
ends. CSV/TSV stream row by row (cells stay strings), Parquet by record batches, a .json array is loaded whole,
and Hub data sets come through `datasets` (`data.streaming: true` iterates without downloading the whole set).
A compressed .txt, .jsonl, .csv or .tsv file (.gz, .bz2, .xz, .zst) is decompressed as it is read, never whole.
A source of several files (a glob, a folder) is read file after file (`read_source`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard

from finetune.errors import UserError, path_problem
from finetune.recipe import DataConfig
from finetune.sources import HubSource, data_suffix, describe

READ_BYTES = 1 << 20  # text handed to a worker at a time (less when shards are small: a batch never spans two)
BYTES_PER_TOKEN = 4  # about, for English text and GPT-2's BPE
ROWS_PER_BATCH = 4096  # for row-based readers (CSV, Parquet, JSON arrays, the Hub)
BOM = "\ufeff"  # a UTF-8 byte order mark starting a file is no part of its text


@dataclass
class RowBatch:
    """Consecutive raw rows of one file: `rows[i]` is row `start + i` (a dict, a JSONL line as bytes, or the
    text of a .txt record); the 1-based file line of row i is `lines[i]` when given, else `first_line + i` when
    that is given, else `start + i + 1`; `nbytes` is how much of a local file (as stored, compressed or not)
    the batch consumed. Read as part of a source (`read_source`): `file` is the file's index among the source's
    files, `offset` the number of the source's rows before it, and `source` the file itself."""

    start: int
    rows: list
    lines: list[int] | None = None
    nbytes: int = 0
    first_line: int | None = None
    file: int = 0
    offset: int = 0
    source: str | HubSource | None = None

    def line(self, i: int) -> int | None:
        if self.lines:
            return self.lines[i]
        return None if self.first_line is None else self.first_line + i


def check_utf8(path: Path) -> None:
    for offset, block, _ in _blocks(path, READ_BYTES):
        _decode(block, path, offset)


def read_utf8(path: Path) -> str:
    """A user's whole text file: checked to be UTF-8 (the error names the byte offset), without a leading BOM."""
    check_utf8(path)
    return path.read_text(encoding="utf-8-sig")


def _decode(block: bytes, path: Any, offset: int) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {offset + exc.start} ({exc.reason})") from None


class RowRef:
    """Names a row for error messages ("file line N"); built for every row, formatted only on error."""

    __slots__ = ("source", "index", "line")

    def __init__(self, source: str | HubSource, index: int, line: int | None = None) -> None:
        self.source, self.index, self.line = source, index, line

    def __str__(self) -> str:
        if isinstance(self.source, HubSource):
            return f"{describe(self.source)} row {self.index + 1}"
        path = Path(self.source)
        if self.line is not None or data_suffix(path)[0] in (".jsonl", ".txt"):
            return f"{path} line {self.line or self.index + 1}"
        return f"{path} row {self.index + 1}"


def parse_row(raw: Any, where: RowRef) -> dict:
    """A raw row as a mapping: JSONL lines are parsed here (in the worker), text records become {'text': ...}."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
        except ValueError as exc:
            raise UserError(f"{where}: not valid JSON: {exc}") from None
    if isinstance(raw, str):
        return {"text": raw}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object (a mapping of fields), got {type(raw).__name__}")
    return raw


@dataclass(frozen=True)
class Position:
    """Where reading a source stands: row `row` of its file `file`, which follows `offset` rows of the source."""
    file: int = 0
    row: int = 0
    offset: int = 0


def read_source(files: list[str | HubSource], cfg: DataConfig, start: Position = Position()) -> Iterator[RowBatch]:
    """The raw rows of a source's files one after the other, from `start` on, at most `cfg.max_records` in all."""
    offset = start.offset
    for index in range(start.file, len(files)):
        remaining = None if cfg.max_records is None else cfg.max_records - offset
        if remaining is not None and remaining <= 0:
            return
        skip = start.row if index == start.file else 0
        rows = skip  # the file's rows, once read
        for batch in read_batches(files[index], replace(cfg, max_records=remaining), skip):
            batch.file, batch.offset, batch.source = index, offset, files[index]
            rows = batch.start + len(batch.rows)
            yield batch
        offset += rows


def count_source_rows(files: list[str | HubSource], cfg: DataConfig) -> list[int] | None:
    """The number of rows `read_source` yields from each file (None for a streamed Hub data set)."""
    counts: list[int] = []
    for path in files:
        remaining = None if cfg.max_records is None else max(cfg.max_records - sum(counts), 0)
        count = count_rows(path, replace(cfg, max_records=remaining)) if remaining != 0 else 0
        if count is None:
            return None
        counts.append(count)
    return counts


def read_batches(source: str | HubSource, cfg: DataConfig, skip: int = 0) -> Iterator[RowBatch]:
    """The file's raw rows in batches, from row `skip` on, at most `data.max_records` rows in all."""
    limit = cfg.max_records
    for batch in _raw_batches(source, cfg):
        end = batch.start + len(batch.rows)
        if limit is not None and batch.start >= limit:
            return
        if end <= skip:
            continue
        first = max(skip - batch.start, 0)
        last = len(batch.rows) if limit is None else min(len(batch.rows), limit - batch.start)
        if first or last < len(batch.rows):
            batch = RowBatch(batch.start + first, batch.rows[first:last], batch.lines and batch.lines[first:last],
                          batch.nbytes, batch.first_line and batch.first_line + first)
        yield batch


def count_rows(source: str | HubSource, cfg: DataConfig) -> int | None:
    """How many rows `read_batches` yields (None for a streamed Hub data set: unknown until read)."""
    if isinstance(source, HubSource) and cfg.streaming:
        return None
    if isinstance(source, str) and source.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with parquet_errors(source):
            rows = pq.ParquetFile(source).metadata.num_rows
        return rows if cfg.max_records is None else min(rows, cfg.max_records)
    return sum(len(batch.rows) for batch in read_batches(source, cfg))


def _raw_batches(source: str | HubSource, cfg: DataConfig) -> Iterator[RowBatch]:
    if isinstance(source, HubSource):
        yield from _hub_batches(source, cfg)
        return
    path = Path(source)
    if problem := path_problem(path):
        raise UserError(f"data file {path}: {problem}")
    suffix = data_suffix(path)[0]
    size = min(READ_BYTES, cfg.shard_tokens * BYTES_PER_TOKEN)
    if suffix == ".txt":
        yield from _text_batches(path, cfg.sample_by, size)
    elif suffix == ".jsonl" or (suffix == ".json" and _first_byte(path) != b"["):
        yield from _jsonl_batches(path, size)
    elif suffix == ".json":
        yield from _json_array_batches(path)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_batches(path, suffix)
    else:
        yield from _parquet_batches(path)


def _first_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        block = handle.read(4096).removeprefix(BOM.encode())
        while block:
            if stripped := block.lstrip():
                return stripped[:1]
            block = handle.read(4096)
    return b""


DECOMPRESSORS = {  # a file on disk -> its decompressed byte stream (a .zst file may hold several frames)
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile,
    ".zst": lambda raw: io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)),
}
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


@contextmanager
def open_data(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(the file's data as a byte stream, decompressed as it is read when the name ends in a compression
    extension; the file on disk under it, whose position is how much of the stored file has been read). A
    corrupt or truncated compressed file is an error naming it."""
    compression = data_suffix(path)[1]
    with path.open("rb") as raw:
        if not compression:
            yield raw, raw
            return
        try:
            with DECOMPRESSORS[compression](raw) as stream:
                yield stream, raw
        except DECOMPRESSION_ERRORS as exc:
            raise UserError(f"{path}: could not be decompressed as {compression} (corrupt or truncated?): "
                            f"{type(exc).__name__}: {exc}") from None


def _blocks(path: Path, size: int) -> Iterator[tuple[int, bytes, int]]:
    """(byte offset in the data, block, bytes of the stored file read for it) of blocks of about `size` bytes,
    each ending at a line end."""
    offset = 0
    with open_data(path) as (handle, raw):
        stored = 0
        for block in iter(lambda: handle.read(size) + handle.readline(), b""):
            yield offset, block, raw.tell() - stored
            offset += len(block)
            stored = raw.tell()


def _jsonl_batches(path: Path, size: int) -> Iterator[RowBatch]:
    """One row per non-blank line; blank lines are skipped and do not count as rows."""
    start, line = 0, 0
    for _, block, stored in _blocks(path, size):
        pieces = block.split(b"\n")
        if pieces[-1] == b"":
            pieces.pop()
        rows = [piece for piece in pieces if piece.strip()]
        if len(rows) == len(pieces):
            yield RowBatch(start, rows, nbytes=stored, first_line=line + 1)
        else:
            lines = [number for number, piece in enumerate(pieces, line + 1) if piece.strip()]
            yield RowBatch(start, rows, lines, stored)
        line += len(pieces)
        start += len(rows)


def _text_batches(path: Path, sample_by: str, size: int) -> Iterator[RowBatch]:
    """As `datasets`' text builder: universal newlines; a row per line, per blank-line-separated paragraph (empty
    ones skipped), or one for the whole file."""
    start, carry = 0, ""
    for offset, block, stored in _blocks(path, size):
        text = _decode(block, path, offset).replace("\r\n", "\n").replace("\r", "\n")
        if offset == 0:
            text = text.removeprefix(BOM)
        if sample_by == "line":
            rows = text.split("\n")
            if rows[-1] == "":
                rows.pop()
        elif sample_by == "paragraph":
            parts = (carry + text).split("\n\n")
            carry = parts.pop()
            rows = [part for part in parts if part]
        else:
            carry += text
            continue
        yield RowBatch(start, rows, nbytes=stored)
        start += len(rows)
    if carry or (sample_by == "document" and start == 0):
        yield RowBatch(start, [carry])


def _json_array_batches(path: Path) -> Iterator[RowBatch]:
    try:
        rows = json.loads(read_utf8(path))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: a .json data file must hold a list of objects (or be JSON lines)")
    for start in range(0, len(rows), ROWS_PER_BATCH):  # the file was read whole: the first batch consumed it
        yield RowBatch(start, rows[start:start + ROWS_PER_BATCH], nbytes=0 if start else path.stat().st_size)


def _csv_batches(path: Path, suffix: str) -> Iterator[RowBatch]:
    """Rows as mappings of the header's column names to the cells as written: strings, never converted ("NA",
    "007", "" stay what they are). A row with fewer cells than the header lacks the last fields (a missing field,
    as in JSON); one with more is an error; blank lines are skipped. Each row carries its first line's number."""
    check_utf8(path)
    # TSV data sets quote nothing
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    csv.field_size_limit(sys.maxsize)  # a cell is as long as the text in it
    with open_data(path) as (stream, raw), io.TextIOWrapper(stream, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, strict=True, **options)
        line, stored = 0, 0  # the last line read before the row being read; the stored bytes already reported
        try:
            header = next((values for values in reader if values), None)
            if header is None:
                raise UserError(f"{path}: no header line (a .{suffix[1:]} file starts with its column names)")
            header_line = line = reader.line_num
            if duplicates := sorted({name for name in header if header.count(name) > 1}):
                raise UserError(f"{path} line {header_line}: column {duplicates[0]!r} is named twice in the header")
            start, rows, lines = 0, [], []
            for values in reader:
                first, line = line + 1, reader.line_num
                if not values:
                    continue
                if len(values) > len(header):
                    raise UserError(f"{path} line {first}: {len(values)} cells, but the header (line {header_line}) "
                                    f"names {len(header)} columns")
                rows.append(dict(zip(header, values)))
                lines.append(first)
                if len(rows) == ROWS_PER_BATCH:
                    yield RowBatch(start, rows, lines, raw.tell() - stored)
                    start, rows, lines, stored = start + len(rows), [], [], raw.tell()
            if rows:
                yield RowBatch(start, rows, lines, raw.tell() - stored)
        except csv.Error as exc:
            raise UserError(f"{path} line {line + 1}: could not be read as {suffix[1:]}: {exc}") from None


@contextmanager
def parquet_errors(path: str | Path) -> Iterator[None]:
    """A file that is not valid parquet is a user error naming it."""
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: could not be read as parquet: {exc}") from None


def _parquet_batches(path: Path) -> Iterator[RowBatch]:
    import pyarrow.parquet as pq

    start, size = 0, path.stat().st_size
    with parquet_errors(path):
        parquet = pq.ParquetFile(path)
        total = max(parquet.metadata.num_rows, 1)
        for record_batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH):
            rows = record_batch.to_pylist()  # the stored bytes, shared out by rows
            yield RowBatch(start, rows, nbytes=size * (start + len(rows)) // total - size * start // total)
            start += len(rows)


def _hub_batches(source: HubSource, cfg: DataConfig) -> Iterator[RowBatch]:
    import datasets

    try:
        data = datasets.load_dataset(source.hub, source.config, split=source.split, revision=source.revision,
                                     streaming=cfg.streaming)
        start = 0
        for columns in data.iter(batch_size=ROWS_PER_BATCH):
            rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
            yield RowBatch(start, rows)
            start += len(rows)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any Hub failure is the user's spec or network
        raise UserError(f"could not load {describe(source)}: {type(exc).__name__}: {exc}") from None


def validation_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """Which of `rows` rows are carved into the validation split: round(rows x fraction) of them (at least
    one), drawn with `seed`."""
    if rows < 2:
        raise UserError("needs at least 2 records to carve a validation split (set data.validation, or for a "
                        ".txt file data.sample_by: line or paragraph)")
    mask = np.zeros(rows, dtype=bool)
    mask[np.random.default_rng(seed).permutation(rows)[:max(1, round(rows * fraction))]] = True
    return mask
