"""Quality per time, from scratch: validation bits per byte on tinyshakespeare against a nanoGPT-style character
model (bench/nanogpt_char.py, nanoGPT's CPU "baby GPT" settings) trained and scored in the same run.

    python -m bench.quality_per_time [key=value ...]   # extra recipe overrides, e.g. train.max_steps=900

nanoGPT's split: train = the first 90 % of the characters, validation = the last 10 %, each one document
(`data.sample_by=document`), written under outputs/bench/quality-per-time/. The real pipeline runs as
subprocesses: `finetune train recipes/scratch-text.yaml` (its shipped settings: BPE vocabulary, shape, schedule,
max_steps sized for the budget) and `finetune eval` with `eval.stride` = the block size, so each validation token
gets 1 to block-1 tokens of context, as in training and in nanoGPT's own evaluation. Bits per byte = total NLL /
ln 2 / UTF-8 bytes of the scored tokens, comparable across tokenizers (a character here is one byte).
The budget is the baseline's whole process up to the end of its training; ours is the whole train process
(start-up, tokenizer training, prepare, training, saving final/), which must not take longer.
Ratio = baseline bits per byte / ours: above 1 is better than the baseline. Goal: <= 2.15 bits per byte.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, record, shared_or_skip
from finetune.recipe import load_recipe

RECIPE = ROOT / "recipes" / "scratch-text.yaml"
OUT = ROOT / "outputs" / "bench" / "quality-per-time"


def split_text(text: Path) -> tuple[Path, Path]:
    content = text.read_text(encoding="utf-8")
    cut = int(len(content) * 0.9)
    OUT.mkdir(parents=True, exist_ok=True)
    train, validation = OUT / "train.txt", OUT / "validation.txt"
    for path, part in ((train, content[:cut]), (validation, content[cut:])):
        if not path.is_file() or path.read_text(encoding="utf-8") != part:
            path.write_text(part, encoding="utf-8")
    return train, validation


def finetune(command: str, overrides: list[str]) -> tuple[str, float]:
    """Run `python -m finetune COMMAND recipe overrides`; returns (its output, wall seconds). Fails loudly."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", command, str(RECIPE), *overrides], cwd=ROOT,
                          capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(f"finetune {command} failed ({done.returncode}):\n{output[-3000:]}")
    return output, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra recipe overrides (for trials)")
    extra = parser.parse_args().overrides
    train, validation = split_text(shared_or_skip("tinyshakespeare/input.txt"))
    overrides = [f"output_dir={OUT / 'run'}", f"data.train={train}", f"data.validation={validation}",
                 "data.sample_by=document", "train.eval_steps=0", "train.resume=never", *extra]
    recipe = load_recipe(RECIPE, overrides)
    baseline = subprocess.run([sys.executable, "-m", "bench.nanogpt_char", str(train), str(validation)], cwd=ROOT,
                              capture_output=True, text=True, check=True)
    baseline = json.loads(baseline.stdout.strip().splitlines()[-1])
    output, process_seconds = finetune("train", overrides)
    end = json.loads(recipe.run.metrics.read_text().splitlines()[-1])
    steps, train_runtime = end["step"], end["train_runtime"]
    block = recipe.data.block_size
    finetune("eval", [*overrides, f"eval.stride={block}", "eval.baseline=false"])
    figures = json.loads(recipe.run.eval_results.read_text())
    manifest = json.loads((recipe.run.prepared / "manifest.json").read_text())
    bits = figures["bits_per_byte"]
    init = recipe.model.init
    print(f"quality per time (tinyshakespeare from scratch; baseline: nanoGPT-style character model, "
          f"{baseline['bits_per_byte']:.3f} bits/byte in {baseline['train_seconds']:.1f} s):")
    record("quality_per_time", {
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": extra,
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "shape": {k: init[k] for k in ("n_layer", "n_head", "n_embd") if k in init}, "block_size": block,
        "vocab_size": manifest["tokenizer"]["vocab_size"], "batch_size": recipe.train.batch_size,
        "lr": recipe.train.lr, "steps": steps,
        "train_bytes_per_token": round(len(train.read_bytes()) / manifest["train"]["tokens"], 3),
        "train_runtime_s": train_runtime, "train_process_s": round(process_seconds, 1),
        "baseline_process_s": round(baseline["train_seconds"], 1),
        "within_budget": process_seconds <= baseline["train_seconds"],
        "tokens_per_s": round(steps * recipe.train.batch_size * block / train_runtime),
        "eval_stride": block, "validation_bits_per_byte": round(bits, 4),
        "validation_loss_nats": round(figures["loss"], 4),
        "baseline_bits_per_byte": round(baseline["bits_per_byte"], 4),
        "ratio_baseline_vs_ours": round(baseline["bits_per_byte"] / bits, 3)})


if __name__ == "__main__":
    main()
