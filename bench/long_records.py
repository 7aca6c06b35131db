"""Prepare's memory on one long record: a JSONL file holding one record of N MB of real text (WikiText-2 and
Shakespeare, repeated) against the same text as one record a line (the baseline), with the real GPT-2
tokenizer, format text. Peak RSS is the OS's: getrusage's maxrss over prepare's processes (the largest of
the main process and its workers), read by a fresh wrapper process per case.

    python -m bench.long_records [--megabytes 50] [--checkout PATH]

--checkout runs another checkout's code (say, one from before the long-text fix) on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, record, shared_or_skip

SOURCES = ("wikitext-2/wikitext2_validation.txt", "tinyshakespeare/input.txt")
PEAK_OF_CHILDREN = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
                    "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def long_text(megabytes: int) -> str:
    text = "\n".join(shared_or_skip(source).read_text(encoding="utf-8") for source in SOURCES)
    return (text * (megabytes * 10**6 // len(text) + 1))[:megabytes * 10**6]


def write_recipe(folder: Path, train: Path, validation: Path, tokenizer: Path) -> Path:
    spec = {"name": folder.name, "output_dir": str(folder / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer)},
            "data": {"train": str(train), "validation": str(validation), "format": "text", "block_size": 1024}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def peak_prepare(recipe: Path, checkout: Path) -> tuple[int, float, dict]:
    """(peak RSS in bytes of prepare's largest process, seconds, the manifest)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK_OF_CHILDREN, sys.executable, "-m", "finetune", "prepare",
                          str(recipe)], env=env, cwd=recipe.parent, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    manifest = json.loads((recipe.parent / "run" / "prepared" / "manifest.json").read_text())
    return int(out.stdout.split()[-1]) * 1024, seconds, manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=50, help="size of the long record")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose code runs prepare")
    args = parser.parse_args()
    tokenizer = shared_or_skip("gpt2-tokenizer")
    text = long_text(args.megabytes)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {"one_record": work / "one.jsonl", "one_record_a_line": work / "lines.jsonl"}
        files["one_record"].write_text(json.dumps({"text": text}) + "\n")
        files["one_record_a_line"].write_text("".join(json.dumps({"text": line}) + "\n" for line in text.split("\n")))
        validation = work / "validation.jsonl"
        validation.write_text(json.dumps({"text": text[:10_000]}) + "\n")
        figures: dict = {"megabytes": args.megabytes, "checkout": str(args.checkout)}
        for case, path in files.items():
            folder = work / case
            folder.mkdir()
            peak, seconds, manifest = peak_prepare(write_recipe(folder, path, validation, tokenizer), args.checkout)
            figures[f"{case}_peak_rss_mb"] = round(peak / 2**20)
            figures[f"{case}_seconds"] = round(seconds, 1)
            figures[f"{case}_tokens"] = manifest["train"]["tokens"]
        figures["ratio_peak_one_record_vs_a_line"] = round(figures["one_record_peak_rss_mb"]
                                                           / figures["one_record_a_line_peak_rss_mb"], 2)
    record("long_records", figures)


if __name__ == "__main__":
    main()
