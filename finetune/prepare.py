"""The prepare stage: recipe data + tokenizer -> `prepared/` (the token store, records eval needs, tokenizer,
manifest), with memory that does not grow with the corpus.

The source is read as a stream of batches; `data.num_proc` worker processes (default: every core, each
tokenizer on one thread) tokenize them, and the main process writes a shard whenever `data.shard_tokens`
tokens (default 16M) have come back. Work goes to `prepared.partial/`, where each finished shard is recorded by
a progress marker written after its files: a killed prepare continues from its last complete shard. Only when
every split is complete is the manifest written and the folder renamed to `prepared/` (the old one moved aside
first), so `prepared/` is either the whole previous result or the whole new one.

The result is cached under a content fingerprint: re-running with nothing changed does no work.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from itertools import chain, islice
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from finetune import __version__, data, store
from finetune.data import RowBatch, RowRef, count_rows, describe, parse_row, read_batches, validation_mask
from finetune.encode import EncodeContext, encode_batch, encode_in_worker, init_worker
from finetune.errors import UserError, writing
from finetune.formats import DataFormat, data_format, encode_texts
from finetune.tokenizer import tokenizer_source, train_tokenizer, with_pad_token
from finetune.recipe import DataConfig, HubSource, Recipe, save_recipe
from finetune.prepared import SPLITS, CacheState, cache_state, read_manifest
from finetune.run_folder import RECIPE_FILE
from finetune.store import ShardData, check_shard, finish_split, token_dtype, write_atomic

POOL_MIN_BYTES = 64 << 20  # below this, in-process tokenizing (on every core) beats starting worker processes


def prepare(recipe: Recipe, force: bool = False) -> dict:
    """Run the stage (or find it cached, or continue a killed run) and return the manifest. Concurrent prepares of
    one run folder (every node of a multi-machine run on a shared filesystem) run one after the other."""
    with recipe.run.locked("prepare", wait=True):
        state = cache_state(recipe, checksums=True)
        if state.manifest and not force:
            print(f"prepare: {recipe.run.prepared} is up to date (fingerprint {state.fingerprint[:12]}); nothing to do")
            return state.manifest
        with writing(recipe.run.prepared_partial):
            return _build(recipe, state, force)


def _build(recipe: Recipe, state: CacheState, force: bool) -> dict:
    out, started = recipe.run.prepared, time.perf_counter()
    tokenizer, digest = state.tokenizer, state.fingerprint
    data.check_sources(recipe.data)
    recipe.run.remove_leftovers(out)
    work = recipe.run.prepared_partial
    recipe.run.claim(work, out)
    marker = work / "fingerprint"
    if force or not marker.is_file() or marker.read_text() != digest:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_atomic(marker, digest.encode())
    elif (work / "progress").is_dir():
        print(f"prepare: continuing the interrupted prepare in {work}")
    cfg = recipe.data
    passes = _passes(cfg)
    routers = {name: Router(source, cfg, mode) for name, (source, mode) in passes.items()}  # counts rows once
    if tokenizer is None:
        tokenizer = _trained_tokenizer(work, recipe, passes["a"][0], routers["a"])
    dtype = token_dtype(len(tokenizer))
    manifest = {"fingerprint": digest, "finetune_version": __version__, "format": cfg.format,
                "block_size": cfg.block_size, "packing": cfg.packing,
                "sources": {s: describe(getattr(cfg, s)) for s in SPLITS if getattr(cfg, s)},
                "source_files": state.source_files,
                "tokenizer": {"source": tokenizer_source(recipe) or "trained", "vocab_size": len(tokenizer),
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
                "token_dtype": dtype.name}
    fmt = data_format(cfg)
    if fmt.label_words():
        manifest["labels"] = _label_info(tokenizer, fmt)
    chunks: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for name, (source, _) in passes.items():
        context = EncodeContext(cfg, source, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, dtype.name)
        for chunk in _run_pass(work, name, source, routers[name], context, _workers(cfg, source)):
            for split, entry in chunk["splits"].items():
                chunks[split].append(entry)
    for split in SPLITS:
        manifest[split] = _finish(work / split, chunks[split], dtype, cfg, describe(getattr(cfg, split) or cfg.train))
    tokenizer.save_pretrained(work / "tokenizer")
    save_recipe(recipe, work / RECIPE_FILE)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    write_atomic(work / "manifest.json", json.dumps(manifest, indent=2).encode())
    _finish_work_folder(work)
    recipe.run.replace(out, work)
    _print_summary(out, manifest)
    return manifest


def _workers(cfg: DataConfig, source: str | HubSource) -> int:
    """`data.num_proc`, or by default: one (this process, the tokenizer on every core) for a local file under
    POOL_MIN_BYTES, where starting workers costs more than they win, and every core otherwise."""
    if cfg.num_proc:
        return cfg.num_proc
    if isinstance(source, str) and Path(source).stat().st_size < POOL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0))


def _passes(cfg: DataConfig) -> dict[str, tuple[str | HubSource, str]]:
    """Source reads and where their rows go: 'a' reads data.train (carving validation out of it unless
    data.validation is given), 'b' reads data.validation."""
    if cfg.validation is None:
        return {"a": (cfg.train, "carve")}
    return {"a": (cfg.train, "train"), "b": (cfg.validation, "validation")}


class Router:
    """Which rows of a pass go to validation: all or none, or when carving the same draw as ever for a source of
    known size, and a seeded Bernoulli draw per row for a streamed Hub data set."""

    def __init__(self, source: str | HubSource, cfg: DataConfig, mode: str) -> None:
        self.mode, self.rows, self.mask = mode, None, None
        if mode == "carve":
            self.rows = count_rows(source, cfg)
            try:
                self.mask = None if self.rows is None else validation_mask(self.rows, cfg.validation_fraction, cfg.seed)
            except UserError as exc:
                raise UserError(f"{describe(source)}: {exc}") from None
            self.seed = cfg.seed
            self.rng = np.random.default_rng(cfg.seed)
            self.fraction = cfg.validation_fraction
            self.drawn = 0

    def flags(self, start: int, count: int) -> np.ndarray:
        """For rows start .. start + count - 1: True where the row belongs to validation."""
        if self.mode != "carve":
            return np.full(count, self.mode == "validation")
        if self.mask is not None:
            return self.mask[start:start + count]
        if start < self.drawn:  # a new read of the source: draw again from the start
            self.rng, self.drawn = np.random.default_rng(self.seed), 0
        if start > self.drawn:  # resuming: replay the draws of the skipped rows
            self.rng.random(start - self.drawn)
        self.drawn = start + count
        return self.rng.random(count) < self.fraction


def _trained_tokenizer(work: Path, recipe: Recipe, source: str | HubSource, router: Router) -> Any:
    """Train a byte-level BPE on the train split's texts (once: a continued prepare reuses it)."""
    folder = work / "trained-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return with_pad_token(AutoTokenizer.from_pretrained(str(folder)))
    cfg = recipe.data
    fmt = data_format(cfg)

    def texts() -> Iterator[str]:
        for batch in read_batches(source, cfg):
            flags = router.flags(batch.start, len(batch.rows))
            for i, raw in enumerate(batch.rows):
                if flags[i]:
                    continue
                where = RowRef(source, batch.start + i, batch.line(i))
                record, _ = fmt.normalize(parse_row(raw, where), where)
                if record is not None:
                    yield from (text for text, _ in fmt.segments(record) if text)

    print(f"prepare: training a byte-level BPE tokenizer (vocab {recipe.tokenizer.train.vocab_size}) on the train "
          "split")
    tokenizer = train_tokenizer(texts(), recipe.tokenizer.train)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _completed_chunks(work: Path, name: str) -> list[dict]:
    """The pass's chunks recorded as complete and still intact; anything after the first bad one is removed."""
    progress = work / "progress"
    progress.mkdir(exist_ok=True)
    done = []
    for index in range(len(list(progress.glob(f"{name}-*.json")))):
        path = progress / f"{name}-{index:05d}.json"
        try:
            chunk = json.loads(path.read_text())
        except (OSError, ValueError):
            break
        if any(check_shard(work / split, entry, checksums=True) for split, entry in chunk["splits"].items()):
            break
        done.append(chunk)
    for path in progress.glob(f"{name}-*.json"):
        if int(path.stem.split("-")[1]) >= len(done):
            path.unlink()
    return done


def _run_pass(work: Path, name: str, source: str | HubSource, router: Router, context: EncodeContext,
              workers: int) -> Iterator[dict]:
    """Tokenize one source into shards, resuming after its last complete chunk; yields every chunk's record."""
    done = _completed_chunks(work, name)
    yield from done
    skip = done[-1]["rows_end"] if done else 0
    if done:
        print(f"prepare: {describe(source)}: {len(done)} shards already complete, continuing from row {skip + 1}")
    jobs = ((batch, router.flags(batch.start, len(batch.rows))) for batch in read_batches(source, context.cfg, skip))
    pending = ChunkBuffer(work, name, len(done), context, skip)
    with _progress_bar(source, context.cfg, router.rows) as bar:
        for batch, results in _encode_all(jobs, context, workers):
            pending.add(results, batch.start + len(batch.rows))
            bar.update(batch, sum(len(r["tokens"]) for r in results.values()))
            if pending.tokens >= context.cfg.shard_tokens:
                yield pending.write()
                pending = ChunkBuffer(work, name, pending.index + 1, context, pending.rows_end)
    if pending.results:
        yield pending.write()


def _encode_all(jobs: Iterator[tuple[RowBatch, np.ndarray]], context: EncodeContext,
                workers: int) -> Iterator[tuple[RowBatch, dict]]:
    """Encode batches in order: in this process when there is one batch or one worker (the tokenizer then uses
    every core itself), otherwise on `workers` processes with one tokenizer thread each, at most two batches
    per worker in flight so that memory stays bounded."""
    head = list(islice(jobs, 2))
    jobs = chain(head, jobs)
    if len(head) < 2 or workers == 1:
        for job in jobs:
            yield job[0], encode_batch(context, *job)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                             initargs=(context,)) as pool:
        in_flight: deque = deque()
        for job in jobs:
            in_flight.append((job[0], pool.submit(encode_in_worker, job)))
            if len(in_flight) >= 2 * workers:
                batch, future = in_flight.popleft()
                yield batch, future.result()
        while in_flight:
            batch, future = in_flight.popleft()
            yield batch, future.result()


class ChunkBuffer:
    """Encoded batches waiting to be written as the next shard of each split."""

    def __init__(self, work: Path, pass_name: str, index: int, context: EncodeContext, rows_start: int) -> None:
        self.work, self.pass_name, self.index, self.context = work, pass_name, index, context
        self.rows_end = rows_start
        self.results: list[dict] = []
        self.tokens = 0

    def add(self, results: dict[str, dict], rows_end: int) -> None:
        self.results.append(results)
        self.tokens += sum(len(r["tokens"]) for r in results.values())
        self.rows_end = rows_end

    def write(self) -> dict:
        """Write each split's shard, then the progress marker that makes the chunk count as complete."""
        name = f"{self.pass_name}-{self.index:05d}"
        splits = sorted({split for results in self.results for split in results})
        chunk = {"rows_end": self.rows_end, "splits": {}}
        for split in splits:
            parts = [results[split] for results in self.results if split in results]
            fmt = self.context.format
            shard = ShardData(tokens=[p["tokens"] for p in parts], docs=[p["docs"] for p in parts],
                              targets=None if fmt.every_token_target else [p["targets"] for p in parts],
                              records=[p["records"] for p in parts] if split in fmt.record_splits else None)
            entry = store.write_shard(self.work / split, name, shard)
            dropped = Counter()
            for p in parts:
                dropped.update(p["dropped"])
            kept = entry["docs"] // (2 if fmt.paired else 1)  # a pair is stored as two sequences
            entry["stats"] = {"records_in": sum(p["records_in"] for p in parts), "records_kept": kept,
                              "dropped": dict(dropped), "truncated": sum(p["truncated"] for p in parts),
                              "target_tokens": None if fmt.every_token_target else
                              sum(int(p["targets"].sum()) for p in parts)}
            chunk["splits"][split] = entry
        write_atomic(self.work / "progress" / f"{name}.json", json.dumps(chunk).encode())
        return chunk


class _ProgressBar:
    """Bytes per second and ETA for local files (rows for other sources), tokens so far and tokens per second."""

    def __init__(self, source: str | HubSource, cfg: DataConfig, rows: int | None) -> None:
        self.tokens = 0
        self.started = time.perf_counter()
        self.by_bytes = isinstance(source, str) and cfg.max_records is None
        name = Path(source).name if isinstance(source, str) else describe(source)
        if self.by_bytes:
            self.bar = tqdm(desc=f"prepare {name}", unit="B", unit_scale=True, unit_divisor=1024,
                            total=Path(source).stat().st_size, dynamic_ncols=True)
        else:
            self.bar = tqdm(desc=f"prepare {name}", unit=" rows", unit_scale=True, total=rows or cfg.max_records,
                            dynamic_ncols=True)

    def update(self, batch: RowBatch, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(batch.nbytes if self.by_bytes else len(batch.rows))
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate / 1e3:.0f}k tokens/s", refresh=False)


@contextmanager
def _progress_bar(source: str | HubSource, cfg: DataConfig, rows: int | None) -> Iterator[_ProgressBar]:
    bar = _ProgressBar(source, cfg, rows)
    try:
        yield bar
    finally:
        bar.bar.close()


def _finish(folder: Path, chunks: list[dict], dtype: np.dtype, cfg: DataConfig, where: str) -> dict:
    """Write the split's plan and split.json; return its manifest figures."""
    folder.mkdir(parents=True, exist_ok=True)
    stats = [entry.pop("stats") for entry in chunks]
    kept = sum(s["records_kept"] for s in stats)
    dropped = Counter()
    for s in stats:
        dropped.update(s["dropped"])
    name = folder.name
    if kept == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in dropped.items()) or "no rows"
        raise UserError(f"{where}: the {name} split is empty after filtering ({reasons})")
    fmt = data_format(cfg)
    every_token_target = fmt.every_token_target
    info = finish_split(folder, chunks, dtype, cfg.block_size, every_token_target, cfg.packing, fmt.paired)
    tokens, rows = info["tokens"], info["rows"]
    targets = tokens - info["pieces"] if every_token_target else sum(s["target_tokens"] for s in stats)
    on_disk = store.store_bytes(folder)
    return {
        "records_in": sum(s["records_in"] for s in stats),
        "records_kept": kept,
        "records_dropped": dict(sorted(dropped.items())),
        "records_truncated": sum(s["truncated"] for s in stats),
        "tokens": tokens,
        "target_tokens": int(targets),
        "sequences": rows,
        "positions": rows * cfg.block_size,
        "packing_efficiency": round(tokens / (rows * cfg.block_size), 4),
        "bytes_on_disk": on_disk,
        "bytes_per_token": round(on_disk / tokens, 3),
    }


def _finish_work_folder(work: Path) -> None:
    """What only a prepare in progress needs goes before the work folder becomes the store."""
    shutil.rmtree(work / "progress")
    shutil.rmtree(work / "trained-tokenizer", ignore_errors=True)
    (work / "fingerprint").unlink()


def _label_info(tokenizer: Any, fmt: DataFormat) -> dict:
    words = fmt.label_words()
    return {"names": fmt.label_names(), "words": words, "token_ids": encode_texts(tokenizer, words)}


def _print_summary(out: Path, manifest: dict) -> None:
    for name in SPLITS:
        s = manifest[name]
        dropped = ", ".join(f"{n} {r}" for r, n in s["records_dropped"].items()) or "none"
        print(f"prepare: {name}: {s['records_kept']}/{s['records_in']} records kept (dropped: {dropped}), "
              f"{s['tokens']} tokens in {s['sequences']} rows, packing efficiency {s['packing_efficiency']:.1%}, "
              f"{s['bytes_per_token']:.2f} bytes/token on disk")
    print(f"prepare: wrote {out} in {manifest['seconds']:.1f}s (fingerprint {manifest['fingerprint'][:12]})")


def ensure_prepared(recipe: Recipe, processes: int = 1) -> dict:
    """The current manifest, preparing first if needed (in a single process only). Checks sizes, not checksums,
    so that train and eval start as fast on a 1 GB store as on a small one (`finetune prepare` rereads them).
    Ranks of a multi-process launch never prepare: a rank tokenizing while the others wait can outlast the
    collective timeout."""
    manifest = cache_state(recipe, checksums=False).manifest
    if manifest is not None:
        return manifest
    if processes == 1:
        return prepare(recipe)
    state = "stale or incomplete" if read_manifest(recipe) else "missing"
    raise UserError(f"{recipe.run.prepared} is {state}, and ranks of a {processes}-process launch do not "
                    f"prepare: run 'finetune prepare {recipe.source}' before 'accelerate launch' "
                    "(make train / make eval with NPROC=n do)")
