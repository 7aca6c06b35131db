"""Prepare at scale: JSONL corpora of 50 MB, 200 MB and 1 GB (real text from ../shared/data, a unique suffix per
document), the real GPT-2 tokenizer, format text, block 1024.

Per corpus: prepare wall time, tokens/s, peak RSS of the whole prepare process tree (the main process and its
workers, summed, sampled from /proc; one worker process per core at every size), bytes per token on disk, and the
time and RSS for `finetune train` to reach its first step on that store. Baseline, in the same run: raw
`tokenizers` batch encoding (all cores) of the smallest corpus's texts.

The largest corpus is also prepared as real corpora ship: cut into --shards files in order, as a folder of
`.jsonl.gz` files and as a glob of `.jsonl.zst` files (decompression included in the time; the same tokens as the
plain file, so the same bytes per token); and a two-source mixture with weights 1 and 3 (every eighth line of the
corpus, and the lines after those, each a folder of .jsonl.gz shards: the same kind of text): its measured token
shares against what the weights say for sources of a and b bytes, 3 x b / (a + 3 x b).

    python -m bench.prepare_scale [--sizes 50,200,1000] [--shards 32] [--keep]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import yaml
import zstandard

from bench.common import ROOT, record, shared_or_skip

WORK = ROOT / "bench" / "results" / "prepare_scale"
SOURCES = ("wikitext-2/wikitext2_validation.txt", "tinyshakespeare/input.txt")


def build_corpus(path: Path, megabytes: int) -> None:
    """Documents of real text (WikiText-2 paragraphs, Shakespeare passages of 20 lines) repeated, each with a
    unique suffix so no two documents are equal, until the file holds `megabytes` MB."""
    if path.is_file() and path.stat().st_size >= megabytes * 10**6:
        return
    paragraphs = [line.strip() for line in shared_or_skip(SOURCES[0]).read_text().splitlines() if line.strip()]
    lines = shared_or_skip(SOURCES[1]).read_text().splitlines()
    paragraphs += ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    tmp = path.with_suffix(".tmp")
    written, number = 0, 0
    with tmp.open("w", encoding="utf-8") as handle:
        while written < megabytes * 10**6:
            for text in paragraphs:
                line = json.dumps({"text": f"{text} (document {number})"}) + "\n"
                handle.write(line)
                written += len(line.encode())
                number += 1
                if written >= megabytes * 10**6:
                    break
    tmp.rename(path)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as handle:
                stack += [int(child) for child in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run_watched(command: list[str], log: Path, until: Path | None = None) -> tuple[float, int, int]:
    """Run `command` (until it exits, or until `until` exists, then kill it): (seconds, peak tree RSS, exit code).
    Its output goes to `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        if until is not None and until.is_file() and until.stat().st_size > 0:
            seconds = time.perf_counter() - started
            process.kill()
            process.wait()
            return seconds, peak, 0
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
    return seconds, peak, process.returncode


def write_recipe(folder: Path, train: str | list, tokenizer: Path) -> Path:
    spec = {"name": "scale", "output_dir": str(folder / "run"),
            "model": {"init": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 1024}},
            "tokenizer": {"path": str(tokenizer)},
            # worker processes at every size and for every layout (by default, data under 64 MB, a compressed
            # file's size estimated, is tokenized in-process: the same text could be prepared in two ways)
            "data": {"train": train, "format": "text", "block_size": 1024, "num_proc": len(os.sched_getaffinity(0))},
            "lora": None,
            "train": {"max_steps": 2, "batch_size": 1, "logging_steps": 1, "save_steps": 1000, "eval_steps": 0}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


COMPRESSORS = {".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6),
               ".zst": lambda raw: zstandard.ZstdCompressor(level=3).stream_writer(raw)}


def write_shards(corpus: Path, folder: Path, shards: int, compression: str, every: int = 1,
                 first: int = 0) -> list[tuple[Path, int]]:
    """The corpus's lines (every `every`-th from line `first`) in order, in `shards` files of about equal size
    (shard-00.jsonl.gz, ...): (file, bytes of JSONL in it) for each. Kept from an earlier run when complete (the
    sizes are recorded beside the folder)."""
    done = folder.with_name(f"{folder.name}.sizes.json")
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        target, sizes = corpus.stat().st_size / every / shards, []
        with corpus.open("rb") as handle:
            lines = islice(handle, first, None, every)
            for number in range(shards):
                path = folder / f"shard-{number:02d}.jsonl{compression}"
                written = 0
                with path.open("wb") as raw, COMPRESSORS[compression](raw) as out:
                    for line in lines:
                        out.write(line)
                        written += len(line)
                        if written >= target and number < shards - 1:
                            break
                sizes.append(written)
        done.write_text(json.dumps(sizes))
    sizes = json.loads(done.read_text())
    return [(folder / f"shard-{n:02d}.jsonl{compression}", size) for n, size in enumerate(sizes)]


def remove_shards(shards: list[tuple[Path, int]]) -> None:
    folder = shards[0][0].parent
    shutil.rmtree(folder)
    folder.with_name(f"{folder.name}.sizes.json").unlink()


def store_digest(prepared: Path) -> str:
    """A digest of each split's token ids in order (whatever the shard boundaries)."""
    digest = hashlib.sha256()
    for split in ("train", "validation"):
        info = json.loads((prepared / split / "split.json").read_text())
        for shard in info["shards"]:
            with (prepared / split / f"{shard['name']}.tokens").open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def prepare_run(folder: Path, train: str | list, tokenizer: Path, baseline: float) -> tuple[dict, dict, Path]:
    """Prepare `train` in a fresh `folder`: (figures, manifest, recipe)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    recipe = write_recipe(folder, train, tokenizer)
    seconds, peak, _ = run_watched([sys.executable, "-m", "finetune", "prepare", str(recipe)], folder / "prepare.log")
    manifest = json.loads((folder / "run" / "prepared" / "manifest.json").read_text())
    tokens = manifest["train"]["tokens"] + manifest["validation"]["tokens"]
    on_disk = manifest["train"]["bytes_on_disk"] + manifest["validation"]["bytes_on_disk"]
    figures = {"tokens": tokens, "prepare_seconds": round(seconds, 1), "prepare_tokens_per_s": round(tokens / seconds),
               "raw_tokenizer_tokens_per_s": round(baseline),
               "ratio_prepare_vs_raw": round(tokens / seconds / baseline, 3),
               "prepare_peak_rss_mb": round(peak / 2**20), "bytes_per_token_on_disk": round(on_disk / tokens, 3)}
    return figures, manifest, recipe


def raw_tokens_per_second(corpus: Path, tokenizer: Path) -> float:
    from transformers import GPT2TokenizerFast

    backend = GPT2TokenizerFast.from_pretrained(tokenizer).backend_tokenizer
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(texts), 2000):
        encoded = backend.encode_batch_fast(texts[start:start + 2000], add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encoded)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50,200,1000", help="corpus sizes in MB (the largest is also sharded)")
    parser.add_argument("--shards", type=int, default=32, help="files the largest corpus is cut into")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and stores in bench/results/")
    args = parser.parse_args()
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    tokenizer = shared_or_skip("gpt2-tokenizer")
    WORK.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    corpora = {size: WORK / f"corpus-{size}mb.jsonl" for size in sizes}
    for size, path in corpora.items():
        build_corpus(path, size)
    baseline = raw_tokens_per_second(corpora[sizes[0]], tokenizer)
    print(f"raw tokenizers encode_batch, all cores: {baseline:,.0f} tokens/s")
    first, plain = None, {}
    for size, corpus in corpora.items():
        folder = WORK / f"run-{size}mb"
        figures, _, recipe = prepare_run(folder, str(corpus), tokenizer, baseline)
        if size == max(sizes):
            plain = {**figures, "digest": store_digest(folder / "run" / "prepared")}
        start_seconds, start_peak, _ = run_watched([sys.executable, "-m", "finetune", "train", str(recipe)],
                                                   folder / "train.log", until=folder / "run" / "metrics.jsonl")
        figures = {"layout": "jsonl", "corpus_mb": size, **figures, "train_first_step_seconds": round(start_seconds, 1),
                   "train_first_step_rss_mb": round(start_peak / 2**20)}
        first = first or figures
        figures["ratio_rss_vs_first"] = round(figures["prepare_peak_rss_mb"] / first["prepare_peak_rss_mb"], 2)
        figures["ratio_train_start_vs_first"] = round(start_seconds / first["train_first_step_seconds"], 2)
        print(f"{size} MB corpus:")
        record("prepare_scale", figures)
        if not args.keep:
            shutil.rmtree(folder)
    size = max(sizes)
    sharded = {compression: write_shards(corpora[size], WORK / f"shards-{size}mb-{compression[1:]}", args.shards,
                                         compression) for compression in COMPRESSORS}
    for compression, shards in sharded.items():
        folder = WORK / f"run-{size}mb-{compression[1:]}"
        # the .gz shards as a folder, the .zst ones as a glob
        source = str(shards[0][0].parent) if compression == ".gz" else str(shards[0][0].parent / "*.jsonl.zst")
        figures, _, _ = prepare_run(folder, source, tokenizer, baseline)
        layout = f"{args.shards} x .jsonl{compression} ({'folder' if compression == '.gz' else 'glob'})"
        figures = {"layout": layout, "corpus_mb": size,
                   "compressed_mb": round(sum(path.stat().st_size for path, _ in shards) / 1e6, 1), **figures,
                   "ratio_rss_vs_jsonl": round(figures["prepare_peak_rss_mb"] / plain["prepare_peak_rss_mb"], 2),
                   "ratio_rss_vs_first": round(figures["prepare_peak_rss_mb"] / first["prepare_peak_rss_mb"], 2),
                   "ratio_throughput_vs_jsonl": round(figures["prepare_tokens_per_s"] / plain["prepare_tokens_per_s"],
                                                      3),
                   "same_tokens_as_jsonl": store_digest(folder / "run" / "prepared") == plain["digest"]}
        print(f"{size} MB corpus as {layout}:")
        record("prepare_scale", figures)
        if not args.keep:
            shutil.rmtree(folder)
    record("prepare_scale", mixture(WORK / f"run-{size}mb-mixture", corpora[size], args.shards, tokenizer, baseline,
                                    args.keep))
    if not args.keep:
        for shards in sharded.values():
            remove_shards(shards)
        for path in corpora.values():
            path.unlink()


def mixture(folder: Path, corpus: Path, shards: int, tokenizer: Path, baseline: float, keep: bool) -> dict:
    """Two sources of the same kind of text (every eighth line of the corpus, and the lines after those), each a
    folder of .jsonl.gz shards, weights 1 and 3: the measured token shares of the train split against what the
    weights say for sources of a and b bytes, 3 x b / (a + 3 x b). Reads half the corpus's bytes in all."""
    sets = [write_shards(corpus, WORK / f"{folder.name}-{name}", max(shards // 8, 1), ".gz", every=8, first=first)
            for first, name in enumerate("ab")]
    train = [str(sets[0][0][0].parent), {"path": str(sets[1][0][0].parent), "weight": 3}]
    figures, manifest, _ = prepare_run(folder, train, tokenizer, baseline)
    a, b = (sum(size for _, size in members) for members in sets)
    expected = 3 * b / (a + 3 * b)
    measured = next(s["token_share"] for s in manifest["sources"] if s["split"] == "train" and s["weight"] == 3)
    print(f"{corpus.stat().st_size // 10**6} MB corpus's lines as a mixture of two sets, weights 1 and 3:")
    if not keep:
        shutil.rmtree(folder)
        for members in sets:
            remove_shards(members)
    return {"layout": "mixture of two .jsonl.gz folders, weights 1 and 3",
            "corpus_mb": round(corpus.stat().st_size / 1e6), "sources_mb": [round(a / 1e6, 1), round(b / 1e6, 1)],
            **figures, "token_share_weight_3": measured, "token_share_weights_say": round(expected, 4),
            "share_deviation_points": round(100 * (measured - expected), 2)}


if __name__ == "__main__":
    main()
