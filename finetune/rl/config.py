"""The `rl` recipe section: the rewards and the sampling and loss knobs of GRPO and RLOO. Everything here is checked
when the recipe loads; the reward code itself is imported, and the scorers loaded, when training starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from finetune.errors import UserError
from finetune.fields import ranged

RL_OBJECTIVES = ("grpo", "rloo")
POLICY_OBJECTIVES = ("dpo", "ipo", "simpo", "kto")  # preference policies: eval samples them against their reference
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass
class RewardSpec:
    """One entry of `rl.rewards`: a Python function or a trained scorer, and its weight in the summed reward."""
    function: str | None = None  # module:name or path/to/file.py:name (relative to the recipe)
    model: str | None = None  # a reward model's or a classification run's final/ (relative to the recipe)
    label: str | None = None  # classification run: the label whose probability is the reward
    weight: float = ranged(1.0, -math.inf)

    @property
    def name(self) -> str:
        """How messages and metrics name it: the function's name, or the model folder (and label)."""
        if self.function is not None:
            return self.function.rsplit(":", 1)[1]
        return Path(self.model).parent.name + (f":{self.label}" if self.label else "")

    def check(self, where: str) -> None:
        if (self.function is None) == (self.model is None):
            raise UserError(f"{where}: set exactly one of 'function' (module:name or file.py:name) or 'model' "
                            "(a reward model's or a classification run's final/ folder)")
        if self.function is None:
            return
        if self.label is not None:
            raise UserError(f"{where}: 'label' applies to a 'model' (a classification run), not to a function")
        source, _, name = self.function.rpartition(":")
        if not source or not NAME.fullmatch(name):
            raise UserError(f"{where}: 'function' = {self.function!r} must be module:name or path/to/file.py:name")
        if source.endswith(".py"):
            if not Path(source).is_file():
                raise UserError(f"{where}: 'function' = {self.function!r}: file {source} not found")
        elif not MODULE.fullmatch(source):
            raise UserError(f"{where}: 'function' = {self.function!r}: {source!r} is neither a .py file nor a module "
                            "name")


@dataclass
class RLConfig:
    """`rl`: what GRPO and RLOO maximise and how they sample (defaults as TRL's, except beta: see README)."""
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_text: Literal["full", "completion"] = "full"  # what f(text) functions and scorers read
    group_size: int = ranged(4, 2)  # completions sampled per prompt
    max_completion_tokens: int = ranged(64, 1)
    temperature: float = ranged(1.0, 0, 2, low_ok=False, high_ok=True)
    beta: float = ranged(0.04, 0)  # weight of the KL divergence to the reference model
    epsilon: float = ranged(0.2, 0, 1, low_ok=False)  # clip range of the probability ratio
    scale_rewards: bool = True  # grpo: advantages divided by their group's standard deviation
    normalize_advantages: bool = False  # rloo: advantages standardised over the batch
    sample_log_steps: int = ranged(50, 0)  # at step 1 and every this many steps, a table of sampled completions
    sample_log_count: int = ranged(4, 1)  # completions in that table


def resolve_reward_paths(rewards: list, resolved: Callable[[str], str]) -> list:
    """Files and folders in `rl.rewards` made absolute (relative to the recipe that names them, as all paths)."""
    out = []
    for spec in rewards:
        if isinstance(spec, dict):
            spec = dict(spec)
            function = spec.get("function")
            if isinstance(function, str) and ".py:" in function:
                source, name = function.rsplit(":", 1)
                spec["function"] = f"{resolved(source)}:{name}"
            if isinstance(spec.get("model"), str):
                spec["model"] = resolved(spec["model"])
        out.append(spec)
    return out


def check_rl(cfg: RLConfig, eval_rewards: list[RewardSpec], objective: str, where: str) -> None:
    if objective not in RL_OBJECTIVES:
        if cfg.rewards:
            raise UserError(f"{where}: 'rl.rewards' is for train.objective grpo or rloo, not {objective}")
        if eval_rewards and objective not in POLICY_OBJECTIVES:
            raise UserError(f"{where}: 'eval.rewards' judges sampled completions: it is for train.objective "
                            f"{', '.join(RL_OBJECTIVES + POLICY_OBJECTIVES)}, not {objective}")
        for i, spec in enumerate(eval_rewards):
            spec.check(f"{where}: 'eval.rewards[{i}]'")
        return
    if not cfg.rewards:
        raise UserError(f"{where}: train.objective {objective} needs at least one reward under 'rl.rewards' "
                        "({function: file.py:name, weight: 1} or {model: FOLDER, label: WORD})")
    for key, rewards in (("rl.rewards", cfg.rewards), ("eval.rewards", eval_rewards)):
        for i, spec in enumerate(rewards):
            spec.check(f"{where}: '{key}[{i}]'")
