"""GRPO rollout throughput (completion tokens/s) and step time of our RLTrainer against TRL's GRPOTrainer (float32,
CPU, plain transformers generation: no vLLM), with the reward curves of both side by side.

    python -m bench.grpo_throughput [--tuning lora|full] [--steps N] [--prompts N] [--group N] [--completion N]
                                    [--layers N] [--width N] [--beta B] [--temperature T] [--threads N]

The same gpt2-shaped model (from `model.init`, seed 0, dropout off; vocabulary 50,257: the real GPT-2 tokenizer),
the same prompts (Alpaca's instructions from ../shared/data/alpaca/alpaca_en_demo.json as `finetune prepare`
stores them; TRL gets their text, which its tokenizer turns back into the same ids: checked), the same group size,
completion length, temperature, beta, clip range, learning rate (constant), loss (TRL's loss_type "grpo", rewards
scaled per group), seed and reward function (`vowel_share` below, TRL's signature, named in our recipe as
`bench.grpo_throughput:vowel_share`). TRL gets the very model object our train stage builds (with its LoRA adapter,
or for full fine-tuning saved first: TRL loads its reference from there, as ours keeps a frozen copy), generating
with a KV cache. Both draw `--prompts` prompts per step and `--group` completions of each; the samplers differ
(seeds, prompt order), so the reward curves are two runs of the same experiment, not the same numbers. Each side
runs in its own process; peak RSS is that process's getrusage maxrss.
Timed: the end of the warm-up steps to the end of the last step (step time: wall clock per step); rollout: the
sampling calls of the timed steps (ours: RLTrainer.sample, TRL: _generate_single_turn), completion tokens counted
with the EOS that ends one. Goal: ours >= 1.5x TRL's rollout tokens/s and step rate.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import comparison_args, record, shared_or_skip, side_argv, side_in_subprocess
from bench.dpo_throughput import NO_DROPOUT
from bench.train_throughput import StepClock

LR = 1e-3
WARMUP = 2
EPSILON = 0.2
VOWELS = set("aeiouAEIOU")


def vowel_share(prompts: list, completions: list[str], **columns) -> list[float]:
    """The share of a completion's characters that are vowels: something a tiny model can learn, whatever its
    length."""
    return [sum(c in VOWELS for c in text) / max(len(text), 1) for text in completions]


def make_recipe(args: argparse.Namespace, prompts: Path, tokenizer: Path, out: Path):
    from finetune.recipe import recipe_from_dict

    shape = {"n_layer": args.layers, "n_head": max(1, args.width // 64), "n_embd": args.width,
             "n_positions": 256, **NO_DROPOUT}
    return recipe_from_dict({
        "name": f"bench-grpo-{args.tuning}", "output_dir": str(out / args.tuning), "model": {"init": shape},
        "tokenizer": {"path": str(tokenizer)},
        "data": {"train": str(prompts), "format": "prompt", "prompt": {"prompt_field": "instruction"},
                 "block_size": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0} if args.tuning == "lora" else None,
        "train": {"objective": "grpo", "max_steps": args.steps, "lr": LR, "scheduler": "constant",
                  "batch_size": args.prompts, "logging_steps": 1, "eval_steps": 0, "save_steps": args.steps + 1,
                  "resume": "never", "seed": 0, "report_to": "none"},
        "rl": {"rewards": [{"function": "bench.grpo_throughput:vowel_share"}], "reward_text": "completion",
               "group_size": args.group, "max_completion_tokens": args.completion, "temperature": args.temperature,
               "beta": args.beta, "epsilon": EPSILON},
    })


class StepRewards(TrainerCallback):
    def __init__(self) -> None:
        self.rewards: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.rewards.append(logs["reward"])


class RolloutClock:
    """Wraps a trainer's sampling method: seconds (wall clock, process CPU) and completion tokens of its calls from
    step `first` on (global_step counts the steps finished)."""

    def __init__(self, trainer, method: str, count, first: int) -> None:
        self.seconds, self.cpu_seconds, self.tokens = 0.0, 0.0, 0
        sample = getattr(trainer, method)

        def timed(*args, **kwargs):
            started, cpu_started = time.perf_counter(), time.process_time()
            result = sample(*args, **kwargs)
            if trainer.state.global_step >= first:
                self.seconds += time.perf_counter() - started
                self.cpu_seconds += time.process_time() - cpu_started
                self.tokens += count(result)
            return result

        setattr(trainer, method, timed)


def trl_trainer(recipe, model, tokenizer):
    """TRL's GRPOTrainer on the prepared prompts' text (re-encoded to the same ids) and the model our stage built."""
    import trl
    from datasets import Dataset

    from finetune.prepared import load_prepared

    prompts = []
    for row in load_prepared(recipe, "train"):
        ids = [int(t) for t in row["input_ids"]]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text)["input_ids"] != ids:
            sys.exit(f"prompt {text!r} does not re-encode to the ids prepare stored")
        prompts.append({"prompt": text})
    cfg, rl = recipe.train, recipe.rl
    args = trl.GRPOConfig(
        output_dir=str(recipe.run.root / "trl"), learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size * rl.group_size,
        num_generations=rl.group_size, max_completion_length=rl.max_completion_tokens, temperature=rl.temperature,
        beta=rl.beta, epsilon=rl.epsilon, loss_type="grpo", scale_rewards="group", max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay, seed=cfg.seed, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, disable_tqdm=True, generation_kwargs={"use_cache": True})
    if recipe.lora is None:  # TRL loads its reference by the model's name: the model as our stage built it
        base = recipe.run.root / "trl-base"
        model.save_pretrained(base)
        model.config._name_or_path = str(base)
    return trl.GRPOTrainer(model=model, reward_funcs=vowel_share, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_list(prompts))


def run_side(side: str, args: argparse.Namespace, recipe) -> dict:
    """One side's run in this process: its per-step mean rewards, rollout tokens/s and seconds per step after
    warm-up, peak RSS."""
    from finetune.prepared import load_prepared_tokenizer
    from finetune.train import build_model, build_trainer

    tokenizer = load_prepared_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    if side == "trl":
        trainer = trl_trainer(recipe, model, tokenizer)
        rollout = RolloutClock(trainer, "_generate_single_turn", lambda out: sum(map(len, out[0])), WARMUP)
    else:
        trainer = build_trainer(recipe, model, tokenizer)
        rollout = RolloutClock(trainer, "sample", lambda out: sum(map(len, out.completion_ids)), WARMUP)
    clock, rewards = StepClock(WARMUP, args.steps), StepRewards()
    trainer.add_callback(clock)
    trainer.add_callback(rewards)
    trainer.train()
    timed = args.steps - WARMUP
    return {"rewards": rewards.rewards, "rollout_tokens_per_s": rollout.tokens / rollout.seconds,
            "rollout_tokens_per_s_cpu": rollout.tokens / rollout.cpu_seconds,
            "rollout_tokens": rollout.tokens, "rollout_s": rollout.seconds,
            "step_s": (clock.stop[0] - clock.start[0]) / timed, "step_s_cpu": (clock.stop[1] - clock.start[1]) / timed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    from finetune.prepare import prepare

    prepare(make_recipe(args, args.prompts_file, args.tokenizer, args.out))
    started = time.perf_counter()
    ours, trl = (side_in_subprocess("bench.grpo_throughput", side, argv) for side in ("ours", "trl"))
    print(f"GRPO, {args.tuning} fine-tuning: {args.layers} layers x {args.width} wide, vocabulary 50257, "
          f"{args.prompts} prompts x {args.group} completions of up to {args.completion} tokens per step, "
          f"temperature {args.temperature}, beta {args.beta}, {args.steps} steps ({WARMUP} warm-up), torch threads "
          f"{torch.get_num_threads()}; {time.perf_counter() - started:.0f} s")
    print(f"  step  {'reward (ours)':<15}{'reward (TRL)':<15}")
    for step, (mine, theirs) in enumerate(zip(ours["rewards"], trl["rewards"]), start=1):
        print(f"  {step:4d}  {mine:<15.4f}{theirs:<15.4f}")
    record("grpo_throughput", {
        "tuning": args.tuning, "layers": args.layers, "width": args.width, "prompts": args.prompts,
        "group": args.group, "completion": args.completion, "temperature": args.temperature, "beta": args.beta,
        "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "ours_rollout_tokens_per_s": round(ours["rollout_tokens_per_s"], 1),
        "trl_rollout_tokens_per_s": round(trl["rollout_tokens_per_s"], 1),
        "rollout_ratio": round(ours["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"], 3),
        "rollout_ratio_by_cpu_time": round(ours["rollout_tokens_per_s_cpu"] / trl["rollout_tokens_per_s_cpu"], 3),
        "ours_step_s": round(ours["step_s"], 3), "trl_step_s": round(trl["step_s"], 3),
        "step_ratio": round(trl["step_s"] / ours["step_s"], 3),
        "step_ratio_by_cpu_time": round(trl["step_s_cpu"] / ours["step_s_cpu"], 3),
        "ours_rollout_share": round(ours["rollout_s"] / (ours["step_s"] * (args.steps - WARMUP)), 3),
        "trl_rollout_share": round(trl["rollout_s"] / (trl["step_s"] * (args.steps - WARMUP)), 3),
        "ours_reward_first_last": [round(ours["rewards"][0], 4), round(ours["rewards"][-1], 4)],
        "trl_reward_first_last": [round(trl["rewards"][0], 4), round(trl["rewards"][-1], 4)],
        "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "trl_peak_rss_mb": round(trl["peak_rss_mb"]),
        "rss_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuning", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--completion", type=int, default=16, help="completion tokens at most")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = comparison_args(parser, ["ours", "trl"], WARMUP)
    args.prompts_file = shared_or_skip("alpaca/alpaca_en_demo.json")
    args.tokenizer = shared_or_skip("gpt2-tokenizer")
    if args.side:
        print(json.dumps(run_side(args.side, args, make_recipe(args, args.prompts_file, args.tokenizer, args.out))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.out = Path(tmp)
        compare(args, side_argv(args, ("tuning", "steps", "prompts", "group", "completion", "layers", "width", "beta",
                                       "temperature", "out")))


if __name__ == "__main__":
    main()
