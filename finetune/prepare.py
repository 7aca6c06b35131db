"""The prepare stage: recipe data + tokenizer -> `prepared/` (the token store, records eval needs, tokenizer,
manifest), with memory that does not grow with the corpus.

Each source is read as a stream of batches (a weighted train source once per pass over it, see `Read`);
`data.num_proc` worker processes (default: every core, each tokenizer on one thread) tokenize them, and the
main process writes a shard whenever `data.shard_tokens` tokens (default 16M) have come back. Work goes to
`prepared.partial/`, where each finished shard is recorded by a progress marker written after its files: a killed
prepare continues from its last complete shard. Only when every split is complete is the manifest written and
the folder renamed to `prepared/` (the old one moved aside first), so `prepared/` is either the whole previous
result or the whole new one.

The result is cached under a content fingerprint: re-running with nothing changed does no work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from finetune import __version__, store
from finetune.data import (Position, RowBatch, RowRef, count_source_rows, parse_row, read_source,
                           validation_mask)
from finetune.encode import ROUTES, SKIP, EncodeContext, encode_batch, encode_in_worker, init_worker
from finetune.errors import UserError, writing
from finetune.formats import DataFormat, data_format, encode_texts
from finetune.tokenizer import tokenizer_source, train_tokenizer, with_pad_token
from finetune.recipe import DataConfig, Recipe, save_recipe
from finetune.sources import (HubSource, LocalSource, Source, data_suffix, describe, describe_spec, source_config,
                              source_files, split_sources)
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
    reads = _reads(cfg)
    routers = {}  # one per source: counts its rows once
    for read in reads:
        if read.index not in routers:
            routers[read.index] = Router(read.files, read.cfg, read.mode)
    if tokenizer is None:
        tokenizer = _trained_tokenizer(work, recipe, [r for r in reads if r.mode != "validation" and not r.repeat],
                                       routers)
    dtype = token_dtype(len(tokenizer))
    manifest = {"fingerprint": digest, "finetune_version": __version__, "format": cfg.format,
                "block_size": cfg.block_size, "packing": cfg.packing,
                "source_files": state.source_files,
                "tokenizer": {"source": tokenizer_source(recipe) or "trained", "vocab_size": len(tokenizer),
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
                "token_dtype": dtype.name}
    fmt = data_format(cfg)
    if fmt.label_words():
        manifest["labels"] = _label_info(tokenizer, fmt)
    chunks: dict[str, list[dict]] = {split: [] for split in SPLITS}
    per_source: dict[tuple[str, int], list[dict]] = {}
    for read in reads:
        context = EncodeContext(read.cfg, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, dtype.name)
        for chunk in _run_read(work, read, routers[read.index], context, _workers(cfg, read.files)):
            for split, entry in chunk["splits"].items():
                chunks[split].append(entry)
                per_source.setdefault((split, read.index), []).append(entry)
    manifest["sources"] = _source_figures(reads, per_source)
    for split in SPLITS:
        where = describe_spec(getattr(cfg, split) or cfg.train)
        manifest[split] = _finish(work / split, chunks[split], dtype, cfg, where)
    tokenizer.save_pretrained(work / "tokenizer")
    save_recipe(recipe, work / RECIPE_FILE)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    write_atomic(work / "manifest.json", json.dumps(manifest, indent=2).encode())
    _finish_work_folder(work)
    recipe.run.replace(out, work)
    _print_summary(out, manifest)
    return manifest


def _workers(cfg: DataConfig, files: list[str | HubSource]) -> int:
    """`data.num_proc`, or by default: one (this process, the tokenizer on every core) for local files under
    POOL_MIN_BYTES of data (a compressed file counted at COMPRESSION_RATIO times its size), where starting
    workers costs more than they win, and every core otherwise."""
    if cfg.num_proc:
        return cfg.num_proc
    if all(isinstance(path, str) for path in files) and sum(
            Path(path).stat().st_size * (COMPRESSION_RATIO if data_suffix(path)[1] else 1) for path in files
    ) < POOL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0))


COMPRESSION_RATIO = 4  # about, for text compressed with gzip or zstd


@dataclass
class Read:
    """One read of one source, named by `name` (its shards and progress markers): its rows go where `mode` says
    (carve: validation where the source's Router draws it, train otherwise). A train source of weight w is read
    ceil(w) times: reads after the first (`repeat` > 0) leave out the rows carved for validation, and a read
    with `keep` < 1 (the last, for a fractional weight) keeps a seeded draw of that share of its train rows."""

    name: str
    index: int  # the source's number: train sources first, then validation sources
    source: Source
    files: list[str | HubSource]
    cfg: DataConfig  # the source's (its max_records and field names)
    mode: str  # carve, train or validation
    repeat: int = 0
    keep: float = 1.0


def _reads(cfg: DataConfig) -> list[Read]:
    """Every read of every source, in order: the train sources' ('a', or 'a000', 'a001', ... when there are
    several reads), then data.validation's ('b', ...)."""
    train, validation = split_sources(cfg.train), split_sources(cfg.validation)
    planned = [("a", i, source, "train" if validation else "carve", repeat, min(source.weight - repeat, 1.0))
               for i, source in enumerate(train) for repeat in range(math.ceil(source.weight))]
    planned += [("b", len(train) + i, source, "validation", 0, 1.0) for i, source in enumerate(validation)]
    files = {index: source_files(source) for _, index, source, *_ in planned}
    reads = []
    for letter in ("a", "b"):
        mine = [plan for plan in planned if plan[0] == letter]
        for number, (_, index, source, mode, repeat, keep) in enumerate(mine):
            name = letter if len(mine) == 1 else f"{letter}{number:03d}"
            reads.append(Read(name, index, source, files[index], source_config(cfg, source), mode, repeat, keep))
    return reads


class RowDraw:
    """A seeded draw for each row of a source read in order, true with probability `fraction`: a new read from
    the start draws the same again, and one resumed mid-way replays the draws of the rows it skips."""

    def __init__(self, seed: int | list[int], fraction: float) -> None:
        self.seed, self.fraction = seed, fraction
        self.rng, self.drawn = np.random.default_rng(seed), 0

    def flags(self, start: int, count: int) -> np.ndarray:
        if start < self.drawn:  # a new read of the source: draw again from the start
            self.rng, self.drawn = np.random.default_rng(self.seed), 0
        if start > self.drawn:  # resuming: replay the draws of the skipped rows
            self.rng.random(start - self.drawn)
        self.drawn = start + count
        return self.rng.random(count) < self.fraction


class Router:
    """Which rows of a source go to validation: all or none, or when carving the same draw as ever for a source
    of known size (its rows numbered across its files), and a seeded draw per row for a streamed Hub data set."""

    def __init__(self, source: str | HubSource | list[str | HubSource], cfg: DataConfig, mode: str) -> None:
        self.mode, self.rows, self.mask = mode, None, None
        if mode == "carve":
            files = source if isinstance(source, list) else [source]
            counts = count_source_rows(files, cfg)
            self.rows = None if counts is None else sum(counts)
            try:
                self.mask = None if self.rows is None else validation_mask(self.rows, cfg.validation_fraction, cfg.seed)
            except UserError as exc:
                raise UserError(f"{', '.join(map(describe, files))}: {exc}") from None
            self.draw = RowDraw(cfg.seed, cfg.validation_fraction)

    def flags(self, start: int, count: int) -> np.ndarray:
        """For rows start .. start + count - 1: True where the row belongs to validation."""
        if self.mode != "carve":
            return np.full(count, self.mode == "validation")
        if self.mask is not None:
            return self.mask[start:start + count]
        return self.draw.flags(start, count)


def _trained_tokenizer(work: Path, recipe: Recipe, reads: list[Read], routers: dict[int, Router]) -> Any:
    """Train a byte-level BPE on the train split's texts (once: a continued prepare reuses it)."""
    folder = work / "trained-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return with_pad_token(AutoTokenizer.from_pretrained(str(folder)))

    def texts() -> Iterator[str]:
        for read in reads:
            fmt = data_format(read.cfg)
            for batch in read_source(read.files, read.cfg):
                flags = routers[read.index].flags(batch.offset + batch.start, len(batch.rows))
                for i, raw in enumerate(batch.rows):
                    if flags[i]:
                        continue
                    where = RowRef(batch.source, batch.start + i, batch.line(i))
                    record, _ = fmt.normalize(parse_row(raw, where), where)
                    if record is not None:
                        yield from (text for text, _ in fmt.segments(record) if text)

    print(f"prepare: training a byte-level BPE tokenizer (vocab {recipe.tokenizer.train.vocab_size}) on the train "
          "split")
    tokenizer = train_tokenizer(texts(), recipe.tokenizer.train)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _completed_chunks(work: Path, name: str) -> list[dict]:
    """The read's chunks recorded as complete and still intact; anything after the first bad one is removed (and
    with it the mark of a finished read)."""
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
            (progress / f"{name}.finished").unlink(missing_ok=True)
    return done


def _run_read(work: Path, read: Read, router: Router, context: EncodeContext, workers: int) -> Iterator[dict]:
    """Tokenize one read of a source into shards, resuming after its last complete chunk (a finished read is not
    read again); yields every chunk's record."""
    done = _completed_chunks(work, read.name)
    yield from done
    finished = work / "progress" / f"{read.name}.finished"
    if finished.is_file():
        return
    start = Position(done[-1]["file"], done[-1]["rows_end"], done[-1]["offset"]) if done else Position()
    if done:
        print(f"prepare: {describe(read.source)}: {len(done)} shards already complete, continuing from row "
              f"{start.row + 1} of {describe(read.files[start.file])}")
    draw = RowDraw([read.cfg.seed, read.index, read.repeat], read.keep) if read.keep < 1 else None

    def routes(batch: RowBatch) -> np.ndarray:
        start, count = batch.offset + batch.start, len(batch.rows)
        validation = router.flags(start, count)
        out = np.where(validation, SKIP if read.repeat else ROUTES.index("validation"), ROUTES.index("train"))
        if draw is not None:
            out[~validation & ~draw.flags(start, count)] = SKIP
        return out

    jobs = ((batch, routes(batch)) for batch in read_source(read.files, read.cfg, start))
    pending = ChunkBuffer(work, read.name, len(done), context, start)
    with _progress_bar(read, router.rows) as bar:
        for batch, results in _encode_all(jobs, context, workers):
            pending.add(results, Position(batch.file, batch.start + len(batch.rows), batch.offset))
            bar.update(batch, sum(len(r["tokens"]) for r in results.values()))
            if pending.tokens >= context.cfg.shard_tokens:
                yield pending.write()
                pending = ChunkBuffer(work, read.name, pending.index + 1, context, pending.end)
    if pending.results:
        yield pending.write()
    write_atomic(finished, b"")


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
                             initargs=(context, os.getpid())) as pool:
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

    def __init__(self, work: Path, read_name: str, index: int, context: EncodeContext, start: Position) -> None:
        self.work, self.read_name, self.index, self.context = work, read_name, index, context
        self.end = start
        self.results: list[dict] = []
        self.tokens = 0

    def add(self, results: dict[str, dict], end: Position) -> None:
        self.results.append(results)
        self.tokens += sum(len(r["tokens"]) for r in results.values())
        self.end = end

    def write(self) -> dict:
        """Write each split's shard, then the progress marker that makes the chunk count as complete."""
        name = f"{self.read_name}-{self.index:05d}"
        splits = sorted({split for results in self.results for split in results})
        chunk = {"file": self.end.file, "rows_end": self.end.row, "offset": self.end.offset, "splits": {}}
        for split in splits:
            parts = [results[split] for results in self.results if split in results]
            fmt = self.context.format
            shard = ShardData(tokens=[p["tokens"] for p in parts], docs=[p["docs"] for p in parts],
                              targets=None if fmt.every_token_target else [p["targets"] for p in parts],
                              records=[p["records"] for p in parts] if split in fmt.record_splits else None,
                              desirable=[p["desirable"] for p in parts] if fmt.unpaired else None)
            entry = store.write_shard(self.work / split, name, shard)
            dropped = Counter()
            for p in parts:
                dropped.update(p["dropped"])
            kept = entry["docs"] // (2 if fmt.paired else 1)  # a pair is stored as two sequences
            entry["stats"] = {"records_in": sum(p["records_in"] for p in parts), "records_kept": kept,
                              "dropped": dict(dropped), "truncated": sum(p["truncated"] for p in parts),
                              "target_tokens": None if fmt.every_token_target else
                              sum(int(p["targets"].sum()) for p in parts)}
            if fmt.unpaired:
                entry["stats"]["desirable"] = sum(int(p["desirable"].sum()) for p in parts)
            chunk["splits"][split] = entry
        write_atomic(self.work / "progress" / f"{name}.json", json.dumps(chunk).encode())
        return chunk


class _ProgressBar:
    """Bytes per second (of the files as stored, compressed or not) and ETA for local files (rows for other
    sources), tokens so far and tokens per second."""

    def __init__(self, read: Read, rows: int | None) -> None:
        self.tokens = 0
        self.started = time.perf_counter()
        cfg = read.cfg
        self.by_bytes = all(isinstance(path, str) for path in read.files) and cfg.max_records is None
        name = Path(read.source.path).name if isinstance(read.source, LocalSource) else describe(read.source)
        if read.repeat or read.keep < 1:
            name += f" (pass {read.repeat + 1} of {math.ceil(read.source.weight)})"
        if self.by_bytes:
            self.bar = tqdm(desc=f"prepare {name}", unit="B", unit_scale=True, unit_divisor=1024,
                            total=sum(Path(path).stat().st_size for path in read.files), dynamic_ncols=True)
        else:
            self.bar = tqdm(desc=f"prepare {name}", unit=" rows", unit_scale=True, total=rows or cfg.max_records,
                            dynamic_ncols=True)

    def update(self, batch: RowBatch, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(batch.nbytes if self.by_bytes else len(batch.rows))
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate / 1e3:.0f}k tokens/s", refresh=False)


@contextmanager
def _progress_bar(read: Read, rows: int | None) -> Iterator[_ProgressBar]:
    bar = _ProgressBar(read, rows)
    try:
        yield bar
    finally:
        bar.bar.close()


def _source_figures(reads: list[Read], entries: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """The manifest's `sources`: per split and source (over all its reads), records in, kept and dropped by
    reason, tokens, and its share of the split's tokens."""
    sources = {read.index: read.source for read in reads}
    totals = Counter()
    for (split, _), shards in entries.items():
        totals[split] += sum(entry["tokens"] for entry in shards)
    out = []
    for (split, index), shards in sorted(entries.items(), key=lambda item: (SPLITS.index(item[0][0]), item[0][1])):
        dropped = Counter()
        for entry in shards:
            dropped.update(entry["stats"]["dropped"])
        tokens = sum(entry["tokens"] for entry in shards)
        out.append({"split": split, "source": describe(sources[index]), "weight": sources[index].weight,
                    "records_in": sum(entry["stats"]["records_in"] for entry in shards),
                    "records_kept": sum(entry["stats"]["records_kept"] for entry in shards),
                    "records_dropped": dict(sorted(dropped.items())), "tokens": tokens,
                    "token_share": round(tokens / max(totals[split], 1), 4)})
    return out


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
    info = finish_split(folder, chunks, dtype, cfg.block_size, every_token_target,
                        cfg.packing and not fmt.prompts_only, fmt.paired)
    tokens, rows = info["tokens"], info["rows"]
    targets = tokens - info["pieces"] if every_token_target else sum(s["target_tokens"] for s in stats)
    on_disk = store.store_bytes(folder)
    rated = {}
    if fmt.unpaired:
        desirable = sum(s["desirable"] for s in stats)
        rated = {"desirable": desirable, "undesirable": kept - desirable}
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
        **rated,
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
