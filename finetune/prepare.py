"""The prepare stage: recipe data + tokenizer -> `prepared/` (packed token rows, records, tokenizer, manifest).

The result is cached under a content fingerprint: re-running with nothing changed does no work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from transformers import AutoTokenizer

from finetune import __version__, data, formats, packing
from finetune.data import Split, describe
from finetune.errors import UserError
from finetune.formats import encode_segments, encode_texts, label_names, segments
from finetune.modeling import load_tokenizer, tokenizer_source, train_tokenizer, with_pad_token
from finetune.recipe import DataConfig, HubSource, Recipe, save_recipe

SPLITS = ("train", "validation")
PREPARE_CODE = [Path(module.__file__) for module in (data, formats, packing)] + [Path(__file__)]


def fingerprint(recipe: Recipe, tokenizer: Any | None) -> str:
    """A digest of everything the prepared data depends on."""
    digest = hashlib.sha256()
    data_section = {k: v for k, v in recipe.to_dict()["data"].items() if k != "num_proc"}
    digest.update(json.dumps({"data": data_section, "tokenizer": recipe.to_dict()["tokenizer"],
                              "tokenizer_source": tokenizer_source(recipe)}, sort_keys=True, default=str).encode())
    for source in (recipe.data.train, recipe.data.validation):
        if isinstance(source, str) and Path(source).is_file():
            digest.update(_file_digest(Path(source)).encode())
        elif isinstance(source, HubSource):
            digest.update(repr(source).encode())
    if tokenizer is not None:
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
        digest.update(repr((tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    for path in PREPARE_CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(recipe: Recipe) -> dict | None:
    path = recipe.prepared_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cache_state(recipe: Recipe) -> tuple[Any | None, str, dict | None]:
    """(the recipe's tokenizer, or None when it is trained; the fingerprint now; the manifest if it matches)."""
    source = tokenizer_source(recipe)
    tokenizer = load_tokenizer(source, recipe.model.trust_remote_code, recipe.model.revision) if source else None
    digest = fingerprint(recipe, tokenizer)
    manifest = read_manifest(recipe)
    current = manifest and manifest.get("fingerprint") == digest and all(
        (recipe.prepared_dir / s).is_dir() for s in SPLITS)
    return tokenizer, digest, manifest if current else None


def prepare(recipe: Recipe, force: bool = False) -> dict:
    """Run the stage (or find it cached) and return the manifest."""
    out = recipe.prepared_dir
    source = tokenizer_source(recipe)
    tokenizer, digest, manifest = _cache_state(recipe)
    if manifest and not force:
        print(f"prepare: {out} is up to date (fingerprint {digest[:12]}); nothing to do")
        return manifest

    started = time.perf_counter()
    splits = data.load_splits(recipe.data)
    if tokenizer is None:
        tokenizer = _train_tokenizer(splits["train"], recipe)
    tmp = out.with_name(f"prepared.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"fingerprint": digest, "finetune_version": __version__, "format": recipe.data.format,
                "block_size": recipe.data.block_size, "packing": recipe.data.packing,
                "sources": {s: describe(getattr(recipe.data, s)) for s in SPLITS if getattr(recipe.data, s)},
                "tokenizer": {"source": source or "trained", "vocab_size": len(tokenizer),
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}}
    if recipe.data.format == "classification":
        manifest["labels"] = _label_info(tokenizer, recipe.data)
    for name, split in splits.items():
        rows, stats = tokenize_and_pack(split, tokenizer, recipe.data, name)
        rows.save_to_disk(str(tmp / name))
        split.records.save_to_disk(str(tmp / "records" / name))
        manifest[name] = stats
    tokenizer.save_pretrained(tmp / "tokenizer")
    save_recipe(recipe, tmp / "recipe.yaml")
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _print_summary(out, manifest)
    return manifest


def _train_tokenizer(train: Split, recipe: Recipe) -> Any:
    texts = (text for record in train.records for text, _ in segments(record, recipe.data) if text)
    print(f"prepare: training a byte-level BPE tokenizer (vocab {recipe.tokenizer.train.vocab_size}) on the train split")
    return train_tokenizer(texts, recipe.tokenizer.train)


def _label_info(tokenizer: Any, cfg: DataConfig) -> dict:
    names = label_names(cfg.classification)
    words = [cfg.classification.label_prefix + name for name in names]
    ids = encode_texts(tokenizer, words)
    return {"names": names, "words": words, "token_ids": ids}


def encode_batch(batch: dict[str, list], tokenizer: Any, cfg: DataConfig) -> dict[str, list]:
    """`datasets.map` function: records -> input_ids, labels (-100 off target) and a drop reason ('' if kept)."""
    columns = list(batch)
    records = [dict(zip(columns, values)) for values in zip(*batch.values())]
    encoded = encode_segments(tokenizer, [segments(record, cfg) for record in records], packing.IGNORE)
    out: dict[str, list] = {"input_ids": [], "labels": [], "dropped": [], "truncated": []}
    for ids, labels in encoded:
        truncated = cfg.format != "text" and len(ids) > cfg.block_size
        reason = ""
        if truncated:
            if cfg.overflow == "drop":
                reason = "too_long"
            ids, labels = ids[:cfg.block_size], labels[:cfg.block_size]
        if labels:
            labels[0] = packing.IGNORE
        if not reason and labels.count(packing.IGNORE) == len(labels):
            reason = "no_target_after_truncation" if truncated else "no_target"
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["dropped"].append(reason)
        out["truncated"].append(truncated and not reason)
    return out


def tokenize_and_pack(split: Split, tokenizer: Any, cfg: DataConfig, name: str) -> tuple[datasets.Dataset, dict]:
    """Tokenize a split's records and pack them into rows; returns the rows and the manifest figures."""
    records = split.records
    # In one process the Rust tokenizer already encodes each batch on every core; num_proc is for huge data.
    encoded = records.map(encode_batch, batched=True, batch_size=10_000, num_proc=cfg.num_proc, keep_in_memory=True,
                          fn_kwargs={"tokenizer": tokenizer, "cfg": cfg},
                          remove_columns=records.column_names, desc=f"tokenize {name}")
    table = encoded.data.table
    reasons = table.column("dropped").to_pylist()
    dropped = Counter(split.dropped)
    dropped.update(r for r in reasons if r)
    kept = table.filter(pa.array([not r for r in reasons])).combine_chunks()
    if kept.num_rows == 0:
        raise UserError(f"the {name} split is empty after tokenization ({dict(dropped)})")
    examples = packing.Flat.from_arrow(kept.column("input_ids").chunk(0), kept.column("labels").chunk(0))
    block = cfg.block_size
    if cfg.format == "text":
        rows = packing.pack_stream(examples, block) if cfg.packing else packing.split_long(examples, block)
    else:
        rows = packing.pack_examples(examples, block) if cfg.packing else packing.one_per_row(examples)
    sequences = len(rows)
    stats = {
        "records_in": split.records_in,
        "records_kept": kept.num_rows,
        "records_dropped": dict(sorted(dropped.items())),
        "records_truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
        "tokens": len(rows.ids),
        "target_tokens": int((rows.labels != packing.IGNORE).sum()),
        "sequences": sequences,
        "positions": sequences * block,
        "packing_efficiency": round(len(rows.ids) / (sequences * block), 4),
    }
    return datasets.Dataset(rows.to_arrow()), stats


def _print_summary(out: Path, manifest: dict) -> None:
    for name in SPLITS:
        s = manifest[name]
        dropped = ", ".join(f"{n} {r}" for r, n in s["records_dropped"].items()) or "none"
        print(f"prepare: {name}: {s['records_kept']}/{s['records_in']} records kept (dropped: {dropped}), "
              f"{s['tokens']} tokens in {s['sequences']} rows, packing efficiency {s['packing_efficiency']:.1%}")
    print(f"prepare: wrote {out} in {manifest['seconds']:.1f}s (fingerprint {manifest['fingerprint'][:12]})")


def ensure_prepared(recipe: Recipe, processes: int = 1) -> dict:
    """Prepare in a single process. Ranks of a multi-process launch only check that it was done before the
    launch: a rank tokenizing while the others wait can outlast the collective timeout."""
    if processes == 1:
        return prepare(recipe)
    manifest = _cache_state(recipe)[2]
    if manifest is None:
        state = "stale (the recipe's data, tokenizer or prepare code changed)" if read_manifest(recipe) else "missing"
        raise UserError(f"{recipe.prepared_dir} is {state}, and ranks of a {processes}-process launch do not "
                        f"prepare: run 'finetune prepare {recipe.source}' before 'accelerate launch' "
                        "(make train / make eval with NPROC=n do)")
    return manifest


def load_prepared(recipe: Recipe, split: str) -> datasets.Dataset:
    path = recipe.prepared_dir / split
    if not path.is_dir():
        raise UserError(f"{path} not found: run 'finetune prepare {recipe.source}' first")
    return datasets.load_from_disk(str(path))


def load_records(recipe: Recipe, split: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(recipe.prepared_dir / "records" / split))


def load_prepared_tokenizer(recipe: Recipe) -> Any:
    return with_pad_token(AutoTokenizer.from_pretrained(str(recipe.prepared_dir / "tokenizer")))
