"""DPO training throughput (pairs/s) and peak RSS of the train stage against TRL's DPOTrainer (float32, CPU).

    python -m bench.dpo_throughput [--tuning lora|full|both] [--steps N] [--batch N] [--block N] [--layers N]
                                   [--width N] [--threads N]

The same gpt2-shaped model (from `model.init`, seed 0, dropout off; vocabulary 50,257: the real GPT-2 tokenizer),
the same pairs (../shared/data/preference/dpo_en_demo.json as `finetune prepare` tokenizes and truncates them),
batch, steps, learning rate (constant), clipping and seed. TRL gets the pairs as the token ids prepare made
(prompt_ids, chosen_ids, rejected_ids read back from the store, put in place of the text its constructor tokenizes,
so both train on the same tokens) and the very
model object our train stage builds (with its LoRA adapter, or for full fine-tuning with a frozen copy as
`ref_model`, as ours). Comparison mode: `data.packing: false`, so each of our rows holds one pair (chosen then
rejected, positions restarting) and a batch holds the same pairs as TRL's batch of the same size, drawn in the same
order (both Trainers shuffle with the same seeded sampler over the same number of pairs): the losses agree step
by step up to float32 rounding. Each side runs in its own process; peak RSS is that process's getrusage maxrss.
Timed: the end of the warm-up steps to the end of the last step, wall clock and process CPU time. Full fine-tuning
also runs ours with `train.preference.precompute_reference` (`cached`: the reference's log-probs computed once
before the first step, outside the timed steps; no frozen copy in memory).
Goal: ours >= 1.5x TRL's pairs/s at no more peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import comparison_args, record, shared_or_skip, side_argv, side_in_subprocess
from bench.train_throughput import StepClock

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LR = 5e-4
WARMUP = 2


def make_recipe(args: argparse.Namespace, pairs: Path, tokenizer: Path, out: Path):
    from finetune.recipe import recipe_from_dict

    shape = {"n_layer": args.layers, "n_head": max(1, args.width // 64), "n_embd": args.width,
             "n_positions": args.block, **NO_DROPOUT}
    return recipe_from_dict({
        "name": f"bench-dpo-{args.tuning}", "output_dir": str(out / args.tuning), "model": {"init": shape},
        "tokenizer": {"path": str(tokenizer)},
        "data": {"train": str(pairs), "format": "preference", "block_size": args.block, "packing": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0} if args.tuning == "lora" else None,
        "train": {"objective": "dpo", "max_steps": args.steps, "lr": LR, "scheduler": "constant",
                  "batch_size": args.batch, "logging_steps": 1, "eval_steps": 0, "save_steps": args.steps + 1,
                  "resume": "never", "seed": 0, "report_to": "none",
                  "preference": {"beta": 0.1, "precompute_reference": args.side == "cached"}},
    })


class StepLosses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def trl_trainer(recipe, model, tokenizer):
    """TRL's DPOTrainer on the prepared pairs (token ids as prepare made them) and the model our stage built."""
    import trl
    from datasets import Dataset

    from finetune.prepared import load_prepared
    from finetune.preference_trainer import frozen_copy

    examples = []
    for row in load_prepared(recipe, "train"):
        cut = [i for i, p in enumerate(row["position_ids"]) if p == 0][1]
        chosen, rejected = (row["input_ids"][:cut], row["labels"][:cut]), (row["input_ids"][cut:], row["labels"][cut:])
        prompt = int((chosen[1] != -100).argmax())  # the prompt: the tokens before the first target
        examples.append({"prompt_ids": chosen[0][:prompt].tolist(), "chosen_ids": chosen[0][prompt:].tolist(),
                          "rejected_ids": rejected[0][prompt:].tolist()})
    cfg = recipe.train
    args = trl.DPOConfig(
        output_dir=str(recipe.run.root / "trl"), beta=cfg.preference.beta, learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay, seed=cfg.seed, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=None, disable_tqdm=True)
    reference = frozen_copy(model) if recipe.lora is None else None
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # TRL always tokenizes text
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                             train_dataset=placeholder)
    trainer.train_dataset = Dataset.from_list(examples)
    return trainer


def run_side(side: str, args: argparse.Namespace, recipe) -> dict:
    """One side's run in this process: its per-step losses, pairs/s (wall, CPU) after warm-up, peak RSS."""
    from finetune.prepared import load_prepared_tokenizer
    from finetune.train import build_model, build_trainer

    tokenizer = load_prepared_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    trainer = trl_trainer(recipe, model, tokenizer) if side == "trl" else build_trainer(recipe, model, tokenizer)
    clock, losses = StepClock(WARMUP, args.steps), StepLosses()
    trainer.add_callback(clock)
    trainer.add_callback(losses)
    trainer.train()
    pairs = (args.steps - WARMUP) * args.batch
    return {"losses": losses.losses, "pairs_per_s": pairs / (clock.stop[0] - clock.start[0]),
            "pairs_per_s_cpu": pairs / (clock.stop[1] - clock.start[1]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def max_difference(a: list[float], b: list[float]) -> float:
    return float(f"{max(abs(x - y) for x, y in zip(a, b)):.3g}")


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    from finetune.prepare import prepare

    prepare(make_recipe(args, args.pairs, args.tokenizer, args.out))
    started = time.perf_counter()
    sides = ["ours", "trl"] + (["cached"] if args.tuning == "full" else [])
    runs = {side: side_in_subprocess("bench.dpo_throughput", side, argv) for side in sides}
    ours, trl = runs["ours"], runs["trl"]
    print(f"DPO, {args.tuning} fine-tuning: {args.layers} layers x {args.width} wide, vocabulary 50257, block "
          f"{args.block}, batch {args.batch} pairs, {args.steps} steps ({WARMUP} warm-up), torch threads "
          f"{torch.get_num_threads()}; {time.perf_counter() - started:.0f} s")
    print("  step  " + "  ".join(f"{'loss (' + side + ')':<16}" for side in sides) + "ours - TRL")
    for step, losses in enumerate(zip(*(runs[side]["losses"] for side in sides)), start=1):
        print(f"  {step:4d}  " + "  ".join(f"{loss:<16.7f}" for loss in losses) + f"{losses[0] - losses[1]:+.2e}")
    cached = runs.get("cached")
    if cached:  # full fine-tuning with train.preference.precompute_reference: no frozen copy, no reference forward
        cached = {"cached_max_loss_difference_vs_trl": max_difference(cached["losses"], trl["losses"]),
                  "cached_pairs_per_s": round(cached["pairs_per_s"], 2),
                  "cached_throughput_ratio": round(cached["pairs_per_s"] / trl["pairs_per_s"], 3),
                  "cached_throughput_ratio_by_cpu_time": round(cached["pairs_per_s_cpu"] / trl["pairs_per_s_cpu"], 3),
                  "cached_peak_rss_mb": round(cached["peak_rss_mb"]),
                  "cached_rss_ratio": round(cached["peak_rss_mb"] / trl["peak_rss_mb"], 3)}
    record("dpo_throughput", {
        "tuning": args.tuning, "layers": args.layers, "width": args.width, "block": args.block, "batch": args.batch,
        "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "max_loss_difference": max_difference(ours["losses"], trl["losses"]),
        "ours_pairs_per_s": round(ours["pairs_per_s"], 2), "trl_pairs_per_s": round(trl["pairs_per_s"], 2),
        "throughput_ratio": round(ours["pairs_per_s"] / trl["pairs_per_s"], 3),
        "throughput_ratio_by_cpu_time": round(ours["pairs_per_s_cpu"] / trl["pairs_per_s_cpu"], 3),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "rss_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3), **(cached or {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuning", choices=["lora", "full", "both"], default="lora")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--block", type=int, default=256, help="tokens per pair (each response <= half)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    args = comparison_args(parser, ["ours", "trl", "cached"], WARMUP)
    args.pairs = shared_or_skip("preference/dpo_en_demo.json")
    args.tokenizer = shared_or_skip("gpt2-tokenizer")
    if args.side:
        print(json.dumps(run_side(args.side, args, make_recipe(args, args.pairs, args.tokenizer, args.out))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for tuning in (["lora", "full"] if args.tuning == "both" else [args.tuning]):
            args.tuning, args.out = tuning, Path(tmp)
            compare(args, side_argv(args, ("tuning", "steps", "batch", "block", "layers", "width", "out")))


if __name__ == "__main__":
    main()
