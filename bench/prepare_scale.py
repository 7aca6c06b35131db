"""Prepare at scale: JSONL corpora of 50 MB, 200 MB and 1 GB (real text from ../shared/data, a unique suffix per
document), the real GPT-2 tokenizer, format text, block 1024.

Per corpus: prepare wall time, tokens/s, peak RSS of the whole prepare process tree (the main process and its
workers, summed, sampled from /proc), bytes per token on disk, and the time and RSS for `finetune train` to
reach its first step on that store. Baseline, in the same run: raw `tokenizers` batch encoding (all cores) of
the 50 MB corpus's texts.

    python -m bench.prepare_scale [--sizes 50,200,1000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

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


def write_recipe(folder: Path, corpus: Path, tokenizer: Path) -> Path:
    spec = {"name": "scale", "output_dir": str(folder / "run"),
            "model": {"init": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 1024}},
            "tokenizer": {"path": str(tokenizer)},
            "data": {"train": str(corpus), "format": "text", "block_size": 1024},
            "lora": None,
            "train": {"max_steps": 2, "batch_size": 1, "logging_steps": 1, "save_steps": 1000, "eval_steps": 0}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


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
    parser.add_argument("--sizes", default="50,200,1000", help="corpus sizes in MB")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and stores in bench/results/")
    args = parser.parse_args()
    tokenizer = shared_or_skip("gpt2-tokenizer")
    WORK.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    corpora = {size: WORK / f"corpus-{size}mb.jsonl" for size in sizes}
    for size, path in corpora.items():
        build_corpus(path, size)
    baseline = raw_tokens_per_second(corpora[sizes[0]], tokenizer)
    print(f"raw tokenizers encode_batch, all cores: {baseline:,.0f} tokens/s")
    first = None
    for size, corpus in corpora.items():
        folder = WORK / f"run-{size}mb"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        recipe = write_recipe(folder, corpus, tokenizer)
        command = [sys.executable, "-m", "finetune", "prepare", str(recipe)]
        seconds, peak, _ = run_watched(command, folder / "prepare.log")
        manifest = json.loads((folder / "run" / "prepared" / "manifest.json").read_text())
        tokens = manifest["train"]["tokens"] + manifest["validation"]["tokens"]
        on_disk = manifest["train"]["bytes_on_disk"] + manifest["validation"]["bytes_on_disk"]
        start_seconds, start_peak, _ = run_watched([sys.executable, "-m", "finetune", "train", str(recipe)],
                                                   folder / "train.log", until=folder / "run" / "metrics.jsonl")
        figures = {"corpus_mb": size, "tokens": tokens, "prepare_seconds": round(seconds, 1),
                   "prepare_tokens_per_s": round(tokens / seconds), "raw_tokenizer_tokens_per_s": round(baseline),
                   "ratio_prepare_vs_raw": round(tokens / seconds / baseline, 3),
                   "prepare_peak_rss_mb": round(peak / 2**20), "bytes_per_token_on_disk": round(on_disk / tokens, 3),
                   "train_first_step_seconds": round(start_seconds, 1),
                   "train_first_step_rss_mb": round(start_peak / 2**20)}
        first = first or figures
        figures["ratio_rss_vs_first"] = round(peak / 2**20 / first["prepare_peak_rss_mb"], 2)
        figures["ratio_train_start_vs_first"] = round(start_seconds / first["train_first_step_seconds"], 2)
        print(f"{size} MB corpus:")
        record("prepare_scale", figures)
        if not args.keep:
            shutil.rmtree(folder)
    if not args.keep:
        for path in corpora.values():
            path.unlink()


if __name__ == "__main__":
    main()
