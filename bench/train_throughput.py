"""Training throughput (tokens/s) of the train stage against a bare PyTorch loop on the same model and data.

    python -m bench.train_throughput [--shape baby|10m|all] [--steps N] [--rounds 2] [--threads N]

Two GPT-2 shapes, no dropout, on tinyshakespeare cut into contiguous rows (one document, so plain causal
attention), tokenized once by `finetune prepare` with a 512-token byte-level BPE:
- baby: nanoGPT's CPU "baby GPT" (n_layer 4, n_head 4, n_embd 128, block 64, batch 12; 0.9M parameters),
  300 steps;
- 10m: n_layer 6, n_head 6, n_embd 384, block 256, batch 8 (10.9M parameters), 25 steps (about 2 s a step here).
The pipeline is the Trainer the train stage builds (collator, callbacks, progress bar, a log every 50 steps);
the bare loop samples the same rows, and both run AdamW with the same settings (the Trainer's default fused
kernel), clipping at 1.0 and a constant learning rate. Timed: the end of the warm-up steps to the end of the
last step. Rounds alternate pipeline and bare loop and the best of each is kept; the CPU-time ratio is steadier
than wall clock when other work shares the machine. Goal: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from bench.common import record, shared_or_skip
from finetune.modeling import parameter_counts
from finetune.prepare import prepare
from finetune.prepared import load_prepared, load_prepared_tokenizer
from finetune.recipe import recipe_from_dict
from finetune.train import build_model, build_trainer, ensure_prepared

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LR = 1e-3


@dataclass
class Case:
    name: str
    shape: dict
    block: int
    batch: int
    steps: int
    warmup: int

    @property
    def timed_tokens(self) -> int:
        return (self.steps - self.warmup) * self.batch * self.block


CASES = {
    "baby": Case("baby", {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64, **NO_DROPOUT},
                 block=64, batch=12, steps=300, warmup=20),
    "10m": Case("10m", {"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256, **NO_DROPOUT},
                block=256, batch=8, steps=25, warmup=5),
}


def split_text(text: Path, out: Path) -> tuple[Path, Path]:
    """nanoGPT's split: train = first 90 % of the characters, validation = the rest; each one document."""
    content = text.read_text()
    cut = int(len(content) * 0.9)
    (out / "train.txt").write_text(content[:cut])
    (out / "validation.txt").write_text(content[cut:])
    return out / "train.txt", out / "validation.txt"


def make_recipe(case: Case, train: Path, validation: Path, out: Path):
    return recipe_from_dict({
        "name": f"bench-train-{case.name}", "output_dir": str(out / case.name), "model": {"init": case.shape},
        "tokenizer": {"train": {"vocab_size": 512, "min_frequency": 2}},
        "data": {"train": str(train), "validation": str(validation), "format": "text", "sample_by": "document",
                 "block_size": case.block},
        "lora": None,
        "train": {"max_steps": case.steps, "lr": LR, "scheduler": "constant", "batch_size": case.batch,
                  "weight_decay": 0.1, "logging_steps": 50, "eval_steps": 0, "save_steps": case.steps,
                  "resume": "never", "seed": 0},
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


def pipeline_tokens_per_s(recipe, case: Case) -> tuple[float, float]:
    """(tokens/s by wall clock, tokens/s by CPU time) of the train stage's Trainer after the warm-up steps."""
    ensure_prepared(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    trainer = build_trainer(recipe, build_model(recipe, tokenizer), tokenizer)
    clock = StepClock(case.warmup, case.steps)
    trainer.add_callback(clock)
    trainer.train()
    return (case.timed_tokens / (clock.stop[0] - clock.start[0]),
            case.timed_tokens / (clock.stop[1] - clock.start[1]))


def bare_model(recipe, case: Case) -> GPT2LMHeadModel:
    tokenizer = json.loads((recipe.run.prepared / "manifest.json").read_text())["tokenizer"]
    torch.manual_seed(0)
    config = GPT2Config(**case.shape, vocab_size=tokenizer["vocab_size"], bos_token_id=tokenizer["eos_token_id"],
                        eos_token_id=tokenizer["eos_token_id"], use_cache=False)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).train()


def bare_tokens_per_s(recipe, case: Case) -> tuple[float, float]:
    rows = load_prepared(recipe, "train")
    full = [row for row in rows if len(row["input_ids"]) == case.block]
    ids = torch.stack([torch.from_numpy(row["input_ids"]) for row in full])
    labels = torch.stack([torch.from_numpy(row["labels"]) for row in full])
    model = bare_model(recipe, case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, fused=True)
    for step in range(case.steps):
        if step == case.warmup:
            started = (time.perf_counter(), time.process_time())
        pick = torch.randint(len(full), (case.batch,))
        loss = model(input_ids=ids[pick], labels=labels[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (case.timed_tokens / (time.perf_counter() - started[0]),
            case.timed_tokens / (time.process_time() - started[1]))


def bench_case(case: Case, train: Path, validation: Path, out: Path, rounds: int) -> None:
    recipe = make_recipe(case, train, validation, out)
    prepare(recipe)
    pipeline, bare = [], []
    for _ in range(rounds):
        pipeline.append(pipeline_tokens_per_s(recipe, case))
        bare.append(bare_tokens_per_s(recipe, case))
    wall = max(p[0] for p in pipeline), max(b[0] for b in bare)
    cpu = max(p[1] for p in pipeline), max(b[1] for b in bare)
    _, parameters = parameter_counts(bare_model(recipe, case))
    print(f"train throughput ({case.name}: {parameters / 1e6:.1f}M parameters, block {case.block}, "
          f"batch {case.batch}):")
    record("train_throughput", {
        "shape": case.name, "parameters": parameters, "block": case.block, "batch": case.batch,
        "steps": case.steps, "timed_steps": case.steps - case.warmup, "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "pipeline_tokens_per_s": round(wall[0]), "bare_loop_tokens_per_s": round(wall[1]),
        "ratio_pipeline_vs_bare": round(wall[0] / wall[1], 3),
        "ratio_by_cpu_time": round(cpu[0] / cpu[1], 3),
        "all_rounds_wall": {"pipeline": [round(p[0]) for p in pipeline], "bare": [round(b[0]) for b in bare]}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*CASES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: per shape, 300 / 25)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = shared_or_skip("tinyshakespeare/input.txt")
    cases = list(CASES.values()) if args.shape == "all" else [CASES[args.shape]]
    with tempfile.TemporaryDirectory() as tmp:
        train, validation = split_text(text, Path(tmp))
        for case in cases:
            if args.steps is not None:
                if args.steps <= case.warmup:
                    parser.error(f"--steps must be above the {case.warmup} warm-up steps of the {case.name} shape")
                case.steps = args.steps
            bench_case(case, train, validation, Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
