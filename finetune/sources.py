"""Data sources: what `data.train` and `data.validation` name, and the files each one stands for.

A split takes one source or a list. A source is a local path (a file, a glob such as `shards/*.jsonl.zst`, or a
folder: its data files, found recursively and sorted) or a Hub spec, written as a string (a path) or a mapping
`{path: ..., weight, max_records, <field names>}` / `{hub: ..., config, split, revision, weight, max_records,
<field names>}`. Data files end in one of DATA_EXTENSIONS; .txt, .jsonl, .csv and .tsv may also be compressed
(COMPRESSIONS), and are then read as a decompressed stream.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from finetune.errors import UserError, path_problem
from finetune.fields import ranged

if TYPE_CHECKING:
    from finetune.recipe import DataConfig

DATA_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
STREAMED_EXTENSIONS = (".txt", ".jsonl", ".csv", ".tsv")  # the kinds of file that may be compressed
GLOB_CHARACTERS = ("*", "?", "[")


@dataclass(kw_only=True)
class SourceOptions:
    """What any source may set: its weight in the train split's mixture (passes over it: 3 reads it three times,
    0.5 keeps a seeded half of its rows), a cap on the rows read from it (default: data.max_records), and field
    names that differ from the recipe's (default: those of the data.format section)."""
    weight: float = ranged(1.0, 0, low_ok=False)
    max_records: int | None = ranged(None, 1)
    text_field: str | None = None
    label_field: str | None = None
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    chosen_field: str | None = None
    rejected_field: str | None = None
    completion_field: str | None = None


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SourceOptions) if f.name.endswith("_field"))


@dataclass(kw_only=True)
class LocalSource(SourceOptions):
    path: str  # a file, a glob or a folder; relative to the recipe that names it


@dataclass(kw_only=True)
class HubSource(SourceOptions):
    hub: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


Source = Union[LocalSource, HubSource]
SourceSpec = Union[str, LocalSource, HubSource, list[Union[str, LocalSource, HubSource]], None]  # the recipe key


def split_sources(spec: SourceSpec) -> list[Source]:
    """A recipe's data.train or data.validation as a list of sources (a bare path is a LocalSource)."""
    items = spec if isinstance(spec, list) else [] if spec is None else [spec]
    return [LocalSource(path=item) if isinstance(item, str) else item for item in items]


def data_suffix(path: str | Path) -> tuple[str, str]:
    """(the data extension, the compression extension or "") of a file name: `a.jsonl.zst` -> (.jsonl, .zst)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


def suffix_problem(path: str) -> str | None:
    """Why a file name is not one prepare reads (None when it is)."""
    kind, compression = data_suffix(path)
    if compression and kind not in STREAMED_EXTENSIONS:
        return (f"a compressed ({compression}) file must hold {', '.join(STREAMED_EXTENSIONS)} data, as in "
                f"corpus.jsonl{compression}")
    if kind not in DATA_EXTENSIONS:
        return (f"a local file must end in one of {', '.join(DATA_EXTENSIONS)} (optionally followed by one of "
                f"{', '.join(COMPRESSIONS)}), or name a folder or a glob; for a Hub data set write {{hub: name, "
                "config: ..., split: ...}")
    return None


def is_data_file(path: str | Path) -> bool:
    return suffix_problem(str(path)) is None


def is_pattern(path: str) -> bool:
    """Whether a path is a glob."""
    return any(char in path for char in GLOB_CHARACTERS)


def source_files(source: Source) -> list[str | HubSource]:
    """The files a source stands for, in reading order: a file itself (a path named as a data file), a glob's or a
    folder's data files sorted by path (a folder's found recursively, hidden ones left out). A source matching
    no data file is an error."""
    if isinstance(source, HubSource):
        return [source]
    path = Path(source.path)
    if is_pattern(source.path):
        found = sorted(p for p in glob.glob(source.path, recursive=True) if Path(p).is_file() and is_data_file(p))
        kind = "glob"
    elif not is_data_file(path) and path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_data_file(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        kind = "folder"
    elif problem := path_problem(path):
        raise UserError(f"data file {path}: {problem}")
    else:
        return [source.path]
    if not found:
        raise UserError(f"data {kind} {source.path}: no data files in it (they end in {', '.join(DATA_EXTENSIONS)}, "
                        f"optionally followed by one of {', '.join(COMPRESSIONS)})")
    return found


def format_field_names(cfg: DataConfig) -> tuple[str, ...]:
    """The field names the recipe's data.format reads (a source may rename them)."""
    section = getattr(cfg, cfg.format, None)
    if not dataclasses.is_dataclass(section):
        return ("text_field",)
    return tuple(f.name for f in dataclasses.fields(section) if f.name in FIELD_NAMES)


def source_config(cfg: DataConfig, source: Source) -> DataConfig:
    """The data config one source is read and encoded with: its max_records and field names in place of the
    recipe's."""
    names = {name: getattr(source, name) for name in format_field_names(cfg) if getattr(source, name) is not None}
    changes: dict = {"max_records": source.max_records or cfg.max_records}
    section = getattr(cfg, cfg.format, None)
    if dataclasses.is_dataclass(section):
        changes[cfg.format] = dataclasses.replace(section, **names)
    else:
        changes.update(names)
    return dataclasses.replace(cfg, **changes)


def describe(source: str | Source) -> str:
    if isinstance(source, HubSource):
        return f"Hub data set {source.hub}" + (f"/{source.config}" if source.config else "") + f" [{source.split}]"
    return source.path if isinstance(source, LocalSource) else str(source)


def describe_spec(spec: SourceSpec) -> str:
    """A split's sources in words ("" for none)."""
    return ", ".join(describe(source) for source in split_sources(spec))


def check_sources(cfg: DataConfig, where: str) -> None:
    """The load-time rules of data.train and data.validation."""
    if not split_sources(cfg.train):
        raise UserError(f"{where}: 'data.train' is required (a local file, folder or glob, a Hub spec {{hub: name}}, "
                        "or a list of them)")
    known = format_field_names(cfg)
    for split in ("train", "validation"):
        for index, source in enumerate(split_sources(getattr(cfg, split))):
            key = f"data.{split}" + (f"[{index}]" if isinstance(getattr(cfg, split), list) else "")
            if isinstance(source, LocalSource) and not is_pattern(source.path) and \
                    not Path(source.path).is_dir() and (problem := suffix_problem(source.path)):
                raise UserError(f"{where}: '{key}' = {source.path!r}: {problem}")
            if split == "validation" and source.weight != 1:
                raise UserError(f"{where}: '{key}.weight': weights mix the train split; each validation source is "
                                "read once")
            given = tuple(name for name in FIELD_NAMES if getattr(source, name) is not None)
            for name in given:
                if name not in known:
                    raise UserError(f"{where}: '{key}.{name}': the {cfg.format} format reads no such field (its "
                                    f"field names: {', '.join(known)})")
            # a format section whose rows come in two shapes (data.chat) says which field names mix them
            section = getattr(source_config(cfg, source), cfg.format, None)
            if problem := getattr(section, "shape_problem", lambda *_: None)(key, given):
                raise UserError(f"{where}: {problem}")
