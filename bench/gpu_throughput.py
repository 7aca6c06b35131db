"""GPU training throughput of the train stage: gpt2 (124M) and gpt2-medium (355M) shapes, LoRA and full
fine-tuning in bf16, packed and unpacked rows, on a real instruction set (../shared/data/alpaca).

    python -m bench.gpu_throughput [--steps 30] [--warmup 10] [--batch 8] [--block 1024]
    python -m bench.gpu_throughput --cpu-smoke   # the same code path on CPU: tiny shape, fp32, 3 steps of 4 x 512,
                                                 # 64 records; figures printed, not recorded

Models are random GPT-2s built from GPT2Config (`model.init`, no download) with the real GPT-2 tokenizer; the
model, LoRA adapter (r 8, alpha 16, preset `all`) and Trainer are the train stage's own (`build_model`,
`build_trainer`), with `train.bf16: true` (bf16 autocast over fp32 weights). Figures per case, over the steps
after the warm-up (CUDA synchronised at both ends):
- tokens/s: real tokens (padding excluded) and positions (padding included);
- MFU = model FLOPs/s / the GPU's dense bf16 peak (table below; null for a GPU not in it). Model FLOPs per real
  token: full fine-tuning 6 N (forward 2 N, backward 4 N); LoRA 4 N + 6 N_lora (the frozen weights still need
  the forward and the activation gradients, 2 N each, but no weight gradients; the adapter needs all three).
  N = parameters without the position embeddings (the tied embedding counts once, as the output layer's matmul);
  attention-score FLOPs (12 L T d per token) are left out, so MFU is a slight understatement;
- peak memory: torch.cuda.max_memory_allocated over model building and training;
- packed vs unpacked: `data.packing` true (examples bin-packed into block-size rows) against false (one example
  a row, padded to the longest in the batch), same rows per batch; the ratio is of real tokens/s.
Without CUDA (and without --cpu-smoke) it prints one skip line and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import record, shared_or_skip
from finetune.modeling import parameter_counts
from finetune.prepare import prepare
from finetune.prepared import load_prepared_tokenizer
from finetune.recipe import recipe_from_dict
from finetune.train import build_model, build_trainer

SHAPES = {"gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
          "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024}}
SMOKE_SHAPE = {"tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64}}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all"}
# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, by device-name substring, first match.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


class TokenCounter:
    """Wraps the stage's collator: queues each batch's (real tokens, positions); the model's forward pre-hook
    takes them off in order, so the totals cover exactly the batches trained on (the data loader reads ahead)."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.queued: deque[tuple[int, int]] = deque()
        self.real = self.positions = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        self.queued.append((sum(len(row["input_ids"]) for row in rows), batch["input_ids"].numel()))
        return batch

    def on_forward(self, module, args, kwargs) -> None:
        if module.training:
            real, positions = self.queued.popleft()
            self.real += real
            self.positions += positions


class Window(TrainerCallback):
    """Time and token totals from the end of step `first` to the end of step `last`."""

    def __init__(self, counter: TokenCounter, first: int, last: int) -> None:
        self.counter, self.first, self.last = counter, first, last
        self.marks: dict[int, tuple[float, int, int]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.first, self.last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step] = (time.perf_counter(), self.counter.real, self.counter.positions)

    def rates(self) -> tuple[float, float]:
        (t0, real0, pos0), (t1, real1, pos1) = self.marks[self.first], self.marks[self.last]
        return (real1 - real0) / (t1 - t0), (pos1 - pos0) / (t1 - t0)


def make_recipe(shape: dict, lora: bool, packing: bool, args: argparse.Namespace, data: Path, tokenizer: Path,
                out: Path):
    name = f"{'lora' if lora else 'full'}-{'packed' if packing else 'unpacked'}"
    return recipe_from_dict({
        "name": name, "output_dir": str(out / name),
        "model": {"init": {**shape, "n_positions": args.block}},
        "tokenizer": {"path": str(tokenizer)},
        "data": {"train": str(data), "format": "instruction", "block_size": args.block, "packing": packing,
                 "max_records": args.max_records},
        "lora": LORA if lora else None,
        "train": {"max_steps": args.steps, "lr": 2e-4 if lora else 6e-5, "scheduler": "constant",
                  "batch_size": args.batch, "bf16": args.bf16, "logging_steps": args.steps, "eval_steps": 0,
                  "save_steps": args.steps, "resume": "never", "seed": 0},
    })


def run_case(recipe, warmup: int, peak: float | None) -> dict:
    """Train `recipe` with the stage's model and Trainer; the figures of the timed steps."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prepare(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    trainer = build_trainer(recipe, model, tokenizer)
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    hook = model.register_forward_pre_hook(counter.on_forward, with_kwargs=True)
    window = Window(counter, warmup, recipe.train.max_steps)
    trainer.add_callback(window)
    trainer.train()
    hook.remove()
    real, positions = window.rates()
    trainable, total = parameter_counts(model)
    dense = total - sum(p.numel() for name, p in model.named_parameters() if name.endswith("wpe.weight"))
    flops_per_token = 6 * dense if recipe.lora is None else 4 * (dense - trainable) + 6 * trainable
    return {
        "trainable_parameters": trainable, "parameters": total,
        "real_tokens_per_s": round(real), "positions_per_s": round(positions),
        "real_token_share": round(real / positions, 4),
        "model_tflops_per_s": round(flops_per_token * real / 1e12, 2),
        "mfu": round(flops_per_token * real / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same path on CPU: tiny shape, 3 steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.batch, args.block, args.max_records = 3, 1, 4, 512, 64
        shapes, args.bf16 = SMOKE_SHAPE, False  # Trainer bf16 needs a GPU (or use_cpu)
    elif not torch.cuda.is_available():
        print("skip: no CUDA device")
        return
    else:
        args.max_records = None
        shapes = SHAPES if args.shape == "all" else {args.shape: SHAPES[args.shape]}
        args.bf16 = True
    if args.steps <= args.warmup:
        parser.error("--steps must be above --warmup")
    data = shared_or_skip("alpaca/alpaca_en_demo.json")
    tokenizer = shared_or_skip("gpt2-tokenizer")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(device) if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name, shape in shapes.items():
            for lora in (True, False):
                mode = f"lora-{LORA['targets']}-r{LORA['r']}" if lora else "full"
                runs = {("packed" if packing else "unpacked"):
                        run_case(make_recipe(shape, lora, packing, args, data, tokenizer, Path(tmp) / shape_name),
                                 args.warmup, peak) for packing in (True, False)}
                figures = {"shape": shape_name, "mode": mode, "device": device, "peak_bf16_flops": peak,
                           "bf16": args.bf16, "batch": args.batch, "block": args.block, "steps": args.steps,
                           "timed_steps": args.steps - args.warmup, **runs,
                           "ratio_packed_vs_unpacked_real_tokens_per_s": round(
                               runs["packed"]["real_tokens_per_s"] / runs["unpacked"]["real_tokens_per_s"], 2)}
                print(f"gpu throughput ({shape_name}, {mode}):")
                if args.cpu_smoke:  # not a GPU figure: shown, not recorded
                    for key, value in figures.items():
                        print(f"  {key}: {value}")
                else:
                    record("gpu_throughput", figures)

if __name__ == "__main__":
    main()
