"""Quality per time, from scratch: validation bits per byte on tinyshakespeare after a 96-second training budget,
against nanoGPT's CPU "baby GPT" (2.70 bits per byte in 96 s on this project's 2-core machines).

    python -m bench.quality_per_time [key=value ...]   # extra recipe overrides, e.g. train.max_steps=900

nanoGPT's split: train = the first 90 % of the characters, validation = the last 10 %, each one document
(`data.sample_by=document`), written under outputs/bench/quality-per-time/. The real pipeline runs as
subprocesses: `finetune train recipes/scratch-text.yaml` (its shipped settings: BPE vocabulary, shape, schedule,
max_steps sized for the budget) and `finetune eval` with `eval.stride` = the block size, so each validation token
gets 1 to block-1 tokens of context, as in training and in nanoGPT's own evaluation. Bits per byte = total NLL /
ln 2 / UTF-8 bytes of the scored tokens, comparable across tokenizers (a character here is one byte).
The budget is the Trainer's own train_runtime (training steps, logging, checkpoints); the whole
train process (start-up, tokenizer training, prepare, saving final/) is reported beside it.
Ratio = 2.70 / ours: above 1 is better than nanoGPT.
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
NANOGPT_BITS_PER_BYTE, BUDGET_SECONDS = 2.70, 96.0


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
    output, process_seconds = finetune("train", overrides)
    end = json.loads((recipe.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    steps, train_runtime = end["step"], end["train_runtime"]
    block = recipe.data.block_size
    finetune("eval", [*overrides, f"eval.stride={block}", "eval.baseline=false"])
    figures = json.loads((recipe.run_dir / "eval.json").read_text())
    manifest = json.loads((recipe.prepared_dir / "manifest.json").read_text())
    bits = figures["bits_per_byte"]
    init = recipe.model.init
    print(f"quality per time (tinyshakespeare from scratch, nanoGPT baseline {NANOGPT_BITS_PER_BYTE} bits/byte "
          f"in {BUDGET_SECONDS:g} s):")
    record("quality_per_time", {
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": extra,
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "shape": {k: init[k] for k in ("n_layer", "n_head", "n_embd") if k in init}, "block_size": block,
        "vocab_size": manifest["tokenizer"]["vocab_size"], "batch_size": recipe.train.batch_size,
        "lr": recipe.train.lr, "steps": steps,
        "train_bytes_per_token": round(len(train.read_bytes()) / manifest["train"]["tokens"], 3),
        "train_runtime_s": train_runtime, "within_budget": train_runtime <= BUDGET_SECONDS,
        "train_process_s": round(process_seconds, 1),
        "tokens_per_s": round(steps * recipe.train.batch_size * block / train_runtime),
        "eval_stride": block, "validation_bits_per_byte": round(bits, 4),
        "validation_loss_nats": round(figures["loss"], 4),
        "ratio_nanogpt_vs_ours": round(NANOGPT_BITS_PER_BYTE / bits, 3)})


if __name__ == "__main__":
    main()
