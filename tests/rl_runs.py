"""Reward-RL runs the tests share: prompts of words, reward files beside the recipe, a recipe writer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import WORDS, write_recipe_file

REWARDS = '''
def has_red(text):
    return 1.0 if "red" in text else 0.0


def red_or_no_opinion(prompts, completions, answer, **columns):
    return [1.0 if "red" in completion else None for completion in completions]
'''


def write_rl_run(folder: Path, model: Path, name: str = "rl", objective: str = "grpo", prompts: int = 32,
                 **rl) -> Path:
    """A reward-RL recipe over `prompts` word prompts (each with an `answer` column) and rewards.py beside it;
    `rl` updates its rl section."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))), "answer": rng.choice(WORDS)}
            for _ in range(prompts)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "rewards.py").write_text(REWARDS)
    raw = {"name": name, "model": {"base": str(model)}, "lora": None,
           "data": {"train": "prompts.jsonl", "format": "prompt", "block_size": 32, "validation_fraction": 0.1},
           "train": {"objective": objective, "max_steps": 30, "lr": 1e-2, "batch_size": 8, "logging_steps": 1,
                     "save_steps": 1000, "scheduler": "constant", "seed": 0, "report_to": "none"},
           "rl": {"rewards": [{"function": "rewards.py:has_red"}], "reward_text": "completion", "group_size": 8,
                  "max_completion_tokens": 8, **rl}}
    return write_recipe_file(folder / f"{name}.yaml", raw)
