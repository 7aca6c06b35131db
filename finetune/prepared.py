"""The prepared data as the other stages read it: whether the store is current (its fingerprint), its
manifest, and its splits, records and tokenizer. finetune/prepare.py writes it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from finetune import data, encode, formats, packing, sources, store
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.sources import HubSource, Source, is_pattern, source_files, split_sources
from finetune.run_folder import RECIPE_FILE
from finetune.store import TokenStore, split_problem
from finetune.tokenizer import load_tokenizer, tokenizer_source, with_pad_token

SPLITS = ("train", "validation")
# What the store's content depends on besides the recipe and the data: the code that writes it.
PREPARE_CODE = [Path(module.__file__) for module in (data, encode, packing, sources, store)]
PREPARE_CODE += [Path(__file__).with_name("prepare.py"), *sorted(Path(formats.__file__).parent.glob("*.py"))]


def fingerprint(recipe: Recipe, tokenizer: Any | None, file_digests: dict[str, str]) -> str:
    """A digest of everything the prepared data depends on; `file_digests` holds the contents of every file of
    the local sources (so adding, removing or changing a file of a folder or a glob changes it)."""
    digest = hashlib.sha256()
    data_section = {k: v for k, v in recipe.to_dict()["data"].items() if k not in ("num_proc", "streaming")}
    digest.update(json.dumps({"data": data_section, "tokenizer": recipe.to_dict()["tokenizer"],
                              "tokenizer_source": tokenizer_source(recipe)}, sort_keys=True, default=str).encode())
    for path, file_digest in file_digests.items():
        digest.update(f"{path}\0{file_digest}\0".encode())
    for source in _sources(recipe):
        if isinstance(source, HubSource):
            digest.update(repr(source).encode())
    if tokenizer is not None:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
        digest.update(repr((tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    for path in PREPARE_CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _sources(recipe: Recipe) -> list[Source]:
    return split_sources(recipe.data.train) + split_sources(recipe.data.validation)


def source_digests(recipe: Recipe, manifest: dict | None) -> dict[str, dict]:
    """Content digests of every file of the local sources, in reading order. A file whose size and modification
    time are those recorded in the manifest keeps its recorded digest (as git's index does), so checking the
    cache costs no pass over a large corpus; any other file is read and hashed. A missing file is left out (the
    fingerprint then differs, and prepare names it)."""
    known = (manifest or {}).get("source_files", {})
    out = {}
    for source in _sources(recipe):
        if isinstance(source, HubSource) or not (is_pattern(source.path) or Path(source.path).exists()):
            continue
        for path in source_files(source):
            stat = Path(path).stat()
            entry = known.get(path, {})
            if entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
                out[path] = entry
            else:
                out[path] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                             "digest": store.file_checksum(Path(path))}
    return out


def read_manifest(recipe: Recipe) -> dict | None:
    path = recipe.run.prepared / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def store_problem(folder: Path, checksums: bool) -> str | None:
    """Why `folder` is not a complete prepared store (None when it is)."""
    for name in ("manifest.json", RECIPE_FILE, "tokenizer/tokenizer.json"):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    for split in SPLITS:
        problem = split_problem(folder / split, checksums)
        if problem:
            return problem
    return None


@dataclass(frozen=True)
class CacheState:
    tokenizer: Any | None  # the recipe's tokenizer; None when prepare trains one
    fingerprint: str  # of the recipe's data, tokenizer, source files and prepare code, now
    source_files: dict[str, dict]  # the local source files' sizes, times and digests
    manifest: dict | None  # the store's manifest when it is current and complete, else None


def cache_state(recipe: Recipe, checksums: bool) -> CacheState:
    """Whether the prepared store is current: its manifest's fingerprint is the one the recipe gives now, and the
    store is complete (present at its written sizes, and with `checksums` reread)."""
    source = tokenizer_source(recipe)
    tokenizer = load_tokenizer(source, recipe.model.trust_remote_code, recipe.model.revision) if source else None
    manifest = read_manifest(recipe)
    files = source_digests(recipe, manifest)
    digest = fingerprint(recipe, tokenizer, {path: entry["digest"] for path, entry in files.items()})
    current = manifest is not None and manifest.get("fingerprint") == digest and \
        store_problem(recipe.run.prepared, checksums) is None
    return CacheState(tokenizer, digest, files, manifest if current else None)


def load_prepared(recipe: Recipe, split: str) -> TokenStore:
    path = recipe.run.prepared / split
    if not path.is_dir():
        raise UserError(f"{path} not found: run 'finetune prepare {recipe.source}' first")
    return TokenStore(path)


def load_records(recipe: Recipe, split: str) -> list[dict]:
    return load_prepared(recipe, split).records()


def load_prepared_tokenizer(recipe: Recipe) -> Any:
    return with_pad_token(AutoTokenizer.from_pretrained(str(recipe.run.prepared / "tokenizer")))
