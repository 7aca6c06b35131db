"""Training throughput (tokens/s) of the train stage against a bare PyTorch loop on the same model and data.

    python -m bench.train_throughput [--steps 300] [--rounds 2] [--threads N]

nanoGPT's CPU "baby GPT" shape (GPT-2 with n_layer 4, n_head 4, n_embd 128, block 64, batch 12, no dropout)
on tinyshakespeare cut into contiguous 64-token rows (one document, so plain causal attention), tokenized once
by `finetune prepare` with a 512-token byte-level BPE. The pipeline is the Trainer the train stage builds
(collator, callbacks, progress bar, a log every 50 steps); the bare loop samples the same rows, and both run
AdamW with the same settings (the Trainer's default fused kernel), clipping at 1.0 and a constant learning
rate. Timed: the end of step WARMUP to the end of the last step. Rounds alternate pipeline and bare loop and
the best of each is kept; the CPU-time ratio is steadier than wall clock when other work shares the machine.
Goal: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from bench.common import record, shared_or_skip
from finetune.prepare import load_prepared, load_prepared_tokenizer, prepare
from finetune.recipe import recipe_from_dict
from finetune.train import build_model, build_trainer, ensure_prepared

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BLOCK, BATCH, LR, WARMUP = 64, 12, 1e-3, 20


def make_recipe(text: Path, out: Path, steps: int):
    """nanoGPT's split: train = first 90 % of the characters, validation = the rest; each one document."""
    content = text.read_text()
    cut = int(len(content) * 0.9)
    (out / "train.txt").write_text(content[:cut])
    (out / "validation.txt").write_text(content[cut:])
    return recipe_from_dict({
        "name": "bench-train", "output_dir": str(out / "run"), "model": {"init": SHAPE},
        "tokenizer": {"train": {"vocab_size": 512, "min_frequency": 2}},
        "data": {"train": str(out / "train.txt"), "validation": str(out / "validation.txt"), "format": "text",
                 "sample_by": "document", "block_size": BLOCK},
        "lora": None,
        "train": {"max_steps": steps, "lr": LR, "scheduler": "constant", "batch_size": BATCH, "weight_decay": 0.1,
                  "logging_steps": 50, "eval_steps": 0, "save_steps": steps, "resume": "never", "seed": 0},
    })


class StepClock(TrainerCallback):
    """Wall-clock and process CPU time from the end of step `first` to the end of step `last`."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.start = self.stop = (0.0, 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.first, self.last):
            now = (time.perf_counter(), time.process_time())
            self.start, self.stop = (now, self.stop) if state.global_step == self.first else (self.start, now)


def pipeline_tokens_per_s(recipe, steps: int) -> tuple[float, float]:
    """(tokens/s by wall clock, tokens/s by CPU time) of the train stage's Trainer after the warm-up steps."""
    ensure_prepared(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    trainer = build_trainer(recipe, build_model(recipe, tokenizer), tokenizer)
    clock = StepClock(WARMUP, steps)
    trainer.add_callback(clock)
    trainer.train()
    tokens = (steps - WARMUP) * BATCH * BLOCK
    return tokens / (clock.stop[0] - clock.start[0]), tokens / (clock.stop[1] - clock.start[1])


def bare_tokens_per_s(recipe, steps: int) -> tuple[float, float]:
    rows = load_prepared(recipe, "train").with_format("torch")
    full = [i for i, ids in enumerate(rows["input_ids"]) if len(ids) == BLOCK]
    ids = torch.stack([rows[i]["input_ids"] for i in full])
    labels = torch.stack([rows[i]["labels"] for i in full])
    tokenizer = json.loads((recipe.prepared_dir / "manifest.json").read_text())["tokenizer"]
    torch.manual_seed(0)
    config = GPT2Config(**SHAPE, vocab_size=tokenizer["vocab_size"], bos_token_id=tokenizer["eos_token_id"],
                        eos_token_id=tokenizer["eos_token_id"], use_cache=False)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    for step in range(steps):
        if step == WARMUP:
            started = (time.perf_counter(), time.process_time())
        pick = torch.randint(len(full), (BATCH,))
        loss = model(input_ids=ids[pick], labels=labels[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = (steps - WARMUP) * BATCH * BLOCK
    return tokens / (time.perf_counter() - started[0]), tokens / (time.process_time() - started[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = shared_or_skip("tinyshakespeare/input.txt")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = make_recipe(text, Path(tmp), args.steps)
        prepare(recipe)
        pipeline, bare = [], []
        for _ in range(args.rounds):
            pipeline.append(pipeline_tokens_per_s(recipe, args.steps))
            bare.append(bare_tokens_per_s(recipe, args.steps))
    wall = max(p[0] for p in pipeline), max(b[0] for b in bare)
    cpu = max(p[1] for p in pipeline), max(b[1] for b in bare)
    print("train throughput (baby GPT, block 64, batch 12):")
    record("train_throughput", {
        "steps": args.steps, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "pipeline_tokens_per_s": round(wall[0]), "bare_loop_tokens_per_s": round(wall[1]),
        "ratio_pipeline_vs_bare": round(wall[0] / wall[1], 3),
        "ratio_by_cpu_time": round(cpu[0] / cpu[1], 3),
        "all_rounds_wall": {"pipeline": [round(p[0]) for p in pipeline], "bare": [round(b[0]) for b in bare]}})


if __name__ == "__main__":
    main()
