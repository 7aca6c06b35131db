"""Load records from local files or the Hub through `datasets`, normalize them and carve a validation split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy

from finetune.errors import UserError
from finetune.formats import RECORD_COLUMNS, label_lookup, normalize
from finetune.recipe import DataConfig, HubSource

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
HEADER_ROWS = {".csv": 1, ".tsv": 1}


@dataclass
class Split:
    """A split's normalized records with the bookkeeping the manifest reports."""

    records: datasets.Dataset
    records_in: int
    dropped: Counter = field(default_factory=Counter)


def check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None


def describe(source: str | HubSource) -> str:
    if isinstance(source, HubSource):
        return f"Hub data set {source.hub}" + (f"/{source.config}" if source.config else "") + f" [{source.split}]"
    return str(source)


def load_raw(source: str | HubSource, cfg: DataConfig) -> datasets.Dataset:
    """Read one source as a `datasets.Dataset` of raw rows (Arrow-cached by `datasets`)."""
    if isinstance(source, HubSource):
        try:
            return datasets.load_dataset(source.hub, source.config, split=source.split, revision=source.revision)
        except Exception as exc:  # noqa: BLE001 - any Hub failure is the user's spec or network
            raise UserError(f"could not load {describe(source)}: {type(exc).__name__}: {exc}") from None
    path = Path(source)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix != ".parquet":
        check_utf8(path)
    kwargs: dict = {}
    if suffix == ".tsv":
        kwargs["delimiter"] = "\t"
        kwargs["quoting"] = 3  # csv.QUOTE_NONE: tab-separated data sets quote nothing
    if suffix == ".txt":
        kwargs["sample_by"] = cfg.sample_by
    try:
        return datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - parse errors from pyarrow/pandas name the problem
        raise UserError(f"{path}: could not be read as {suffix[1:]}: {type(exc).__name__}: {exc}") from None


class RowRef:
    """Names a row for error messages ("file line N"); built for every row, formatted only on error."""

    __slots__ = ("source", "index")

    def __init__(self, source: str | HubSource, index: int) -> None:
        self.source, self.index = source, index

    def __str__(self) -> str:
        if isinstance(self.source, HubSource):
            return f"{describe(self.source)} row {self.index + 1}"
        path = Path(self.source)
        if path.suffix.lower() == ".jsonl":
            return f"{path} line {self.index + 1}"
        header = HEADER_ROWS.get(path.suffix.lower(), 0)
        return f"{path} row {self.index + 1}" + (f" (line {self.index + 1 + header})" if header else "")


def normalize_dataset(
    raw: datasets.Dataset, source: str | HubSource, cfg: DataConfig, n_parts: int = 1, part_of: list[int] | None = None
) -> list[Split]:
    """Raw rows -> normalized records of the recipe's format, routed into `n_parts` splits by `part_of[row]`.

    Empty rows are dropped and counted; a malformed row raises a UserError naming the file and row.
    """
    columns = RECORD_COLUMNS[cfg.format]
    outs: list[dict[str, list]] = [{name: [] for name in columns} for _ in range(n_parts)]
    dropped = [Counter() for _ in range(n_parts)]
    totals = [0] * n_parts
    labels = label_lookup(cfg.classification) if cfg.format == "classification" else None
    columns_in = raw.to_dict()
    names = list(columns_in)
    for index, values in enumerate(zip(*columns_in.values())):
        part = part_of[index] if part_of is not None else 0
        totals[part] += 1
        record, reason = normalize(dict(zip(names, values)), cfg, RowRef(source, index), labels)
        if record is None:
            dropped[part][reason] += 1
            continue
        for name in columns:
            outs[part][name].append(record[name])
    return [Split(datasets.Dataset.from_dict(out), records_in=total, dropped=drop)
            for out, total, drop in zip(outs, totals, dropped)]


def load_splits(cfg: DataConfig) -> dict[str, Split]:
    """The train and validation splits as normalized records; validation is carved from train when not given."""
    raw_train = _limit(load_raw(cfg.train, cfg), cfg.max_records)
    if cfg.validation is not None:
        raw_validation = _limit(load_raw(cfg.validation, cfg), cfg.max_records)
        splits = {"train": normalize_dataset(raw_train, cfg.train, cfg)[0],
                  "validation": normalize_dataset(raw_validation, cfg.validation, cfg)[0]}
        sources = {"train": cfg.train, "validation": cfg.validation}
    else:
        if len(raw_train) < 2:
            raise UserError(f"{describe(cfg.train)}: needs at least 2 records to carve a validation split "
                            "(set data.validation, or for a .txt file data.sample_by: line or paragraph)")
        size = max(1, round(len(raw_train) * cfg.validation_fraction))
        part_of = [0] * len(raw_train)
        for index in numpy.random.default_rng(cfg.seed).permutation(len(raw_train))[:size]:
            part_of[index] = 1
        train, validation = normalize_dataset(raw_train, cfg.train, cfg, n_parts=2, part_of=part_of)
        splits = {"train": train, "validation": validation}
        sources = {"train": cfg.train, "validation": cfg.train}
    for name, split in splits.items():
        if len(split.records) == 0:
            reasons = ", ".join(f"{n} {r}" for r, n in split.dropped.items()) or "no rows"
            raise UserError(f"{describe(sources[name])}: the {name} split is empty after filtering ({reasons})")
    return splits


def _limit(raw: datasets.Dataset, max_records: int | None) -> datasets.Dataset:
    if max_records is not None and len(raw) > max_records:
        return raw.select(range(max_records))
    return raw
