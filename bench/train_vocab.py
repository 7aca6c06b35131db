"""Training at the real GPT-2 vocabulary (50,257): the train stage (chunked loss) against a bare PyTorch loop
with the transformers loss, each in its own process so that peak RSS is its own; and the chunk-size sweep.

    python -m bench.train_vocab [--shape small|gpt2|all] [--chunks 256,512,1024,2048,none]

Shapes, both without dropout, on WikiText-2 text tokenized with the real GPT-2 tokenizer:
- small: 2 layers x 128 wide (6.6M parameters, nearly all in the embedding), block 128, batch 16, 40 steps;
- gpt2: gpt2-small's shape (12 x 768, 124M parameters), block 128, batch 4, 8 steps.
Both loops run AdamW (fused) at a constant learning rate with clipping at 1.0 on full rows of the same store;
timed from the end of the warm-up steps to the end of the last one. The pipeline runs as `finetune train` does
(glibc keeps freed memory, see allocator.keep_freed_memory); the bare loop as a user's script would. Goal: ratio
>= 1.6 on the small shape.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, record, shared_or_skip
from bench.train_throughput import NO_DROPOUT, Case, bare_tokens_per_s, pipeline_tokens_per_s
from finetune.allocator import keep_freed_memory
from finetune.prepare import prepare
from finetune.recipe import recipe_from_dict

CASES = {
    "small": Case("small", {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 128, **NO_DROPOUT},
                  block=128, batch=16, steps=40, warmup=5),
    "gpt2": Case("gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 128, **NO_DROPOUT},
                 block=128, batch=4, steps=8, warmup=2),
}


def make_recipe(case: Case, out: Path, chunk: int | None):
    return recipe_from_dict({
        "name": f"bench-vocab-{case.name}", "output_dir": str(out / case.name), "model": {"init": case.shape},
        "tokenizer": {"path": str(shared_or_skip("gpt2-tokenizer"))},
        "data": {"train": str(shared_or_skip("wikitext-2/wikitext2_validation.txt")), "format": "text",
                 "block_size": case.block, "validation_fraction": 0.01},
        "lora": None,
        "train": {"max_steps": case.steps, "lr": 1e-3, "scheduler": "constant", "batch_size": case.batch,
                  "weight_decay": 0.1, "logging_steps": 50, "eval_steps": 0, "save_steps": case.steps,
                  "resume": "never", "seed": 0, "loss_chunk": chunk},
    })


def child(kind: str, case: Case, out: Path, chunk: int | None) -> None:
    """Run one loop in this process and print its figures as JSON."""
    recipe = make_recipe(case, out, chunk)
    if kind == "pipeline":
        keep_freed_memory()  # as `finetune train` does at start-up
    wall, _ = pipeline_tokens_per_s(recipe, case) if kind == "pipeline" else bare_tokens_per_s(recipe, case)
    print(json.dumps({"tokens_per_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "system_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_stime}))


def run_child(kind: str, case: Case, out: Path, chunk: int | None) -> dict:
    command = [sys.executable, "-m", "bench.train_vocab", "--child", kind, "--shape", case.name, "--out", str(out),
               "--chunks", "none" if chunk is None else str(chunk)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_chunks(text: str) -> list[int | None]:
    return [None if part == "none" else int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*CASES, "all"], default="all")
    parser.add_argument("--chunks", default="1024", help="loss_chunk values to time, comma-separated ('none' = off)")
    parser.add_argument("--child", choices=["pipeline", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, CASES[args.shape], Path(args.out), parse_chunks(args.chunks)[0])
        return
    cases = list(CASES.values()) if args.shape == "all" else [CASES[args.shape]]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            prepare(make_recipe(case, Path(tmp), None))
            bare = run_child("bare", case, Path(tmp), None)
            for chunk in parse_chunks(args.chunks):
                pipeline = run_child("pipeline", case, Path(tmp), chunk)
                print(f"train at vocab 50,257 ({case.name}, block {case.block}, batch {case.batch}, "
                      f"loss_chunk {chunk}):")
                record("train_vocab", {
                    "shape": case.name, "block": case.block, "batch": case.batch, "steps": case.steps,
                    "loss_chunk": chunk, "pipeline_tokens_per_s": round(pipeline["tokens_per_s"]),
                    "bare_loop_tokens_per_s": round(bare["tokens_per_s"]),
                    "ratio_pipeline_vs_bare": round(pipeline["tokens_per_s"] / bare["tokens_per_s"], 2),
                    "pipeline_peak_rss_mb": round(pipeline["peak_rss_mb"]),
                    "bare_peak_rss_mb": round(bare["peak_rss_mb"]),
                    "pipeline_system_s": round(pipeline["system_seconds"], 1),
                    "bare_system_s": round(bare["system_seconds"], 1)})


if __name__ == "__main__":
    main()
