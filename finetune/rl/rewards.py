"""The rewards a recipe names under `rl.rewards`, loaded once when training starts and called on every batch of
completions. The recipe names code that runs: a function from a module (`module:name`) or a file beside the recipe
(`path/to/file.py:name`), in one of two shapes:

- `f(text) -> number | None`, called per completion with the prompt and the completion (`rl.reward_text: full`)
  or the completion alone (`completion`);
- TRL's `f(prompts, completions, **columns) -> list[number | None]`, called once per batch with the prompts as
  the data gives them (a string or a list of messages), the completions (a string, or for a conversation
  `[{"role": "assistant", "content": ...}]`) and the rows' other columns as lists (it is this shape when it has a
  `completions` parameter or takes **kwargs).

Or a trained scorer: a reward model's final/ (its scalar reward) or a classification run's final/ (the probability
of `label`'s word among the run's label words), reading the same text as an f(text) function.

None is "no opinion": left out of the weighted sum (a completion no reward has an opinion on gets no advantage). A
reward that returns the wrong number of values, a value that is not a number, NaN or infinity stops the run with
one UserError naming it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.collate import PairCollator
from finetune.errors import UserError
from finetune.formats import data_format, encode_segments, encode_texts
from finetune.generation.window import fit_prompt
from finetune.metrics import label_loglikelihoods, scoring_row
from finetune.modeling import context_length, is_reward_model, load_final, trained_recipe
from finetune.recipe import Recipe
from finetune.reward import sequence_rewards
from finetune.rl.config import RewardSpec
from finetune.tokenizer import load_tokenizer


@dataclass
class Completions:
    """One batch to score: per completion its prompt (as in the data), the prompt's text as the model read it, the
    completion's text, and the row's other columns."""
    prompts: list
    prompt_texts: list[str]
    texts: list[str]
    columns: list[dict]

    def reward_texts(self, full: bool) -> list[str]:
        return [p + c for p, c in zip(self.prompt_texts, self.texts)] if full else list(self.texts)

    def trl_completions(self) -> list:
        return [c if isinstance(p, str) else [{"role": "assistant", "content": c}]
                for p, c in zip(self.prompts, self.texts)]


def completions_of(records: list[dict], texts: list[str], prompt_texts: Iterable[str]) -> Completions:
    """The batch to score: completions `texts` of the prompts of prepared `prompt` records (one per completion)."""
    return Completions(prompts=[r["prompt"] for r in records], prompt_texts=list(prompt_texts), texts=texts,
                       columns=[r["columns"] for r in records])


class Reward:
    """One entry of `rl.rewards`, callable on a batch: its values (None: no opinion) in completion order."""

    def __init__(self, spec: RewardSpec, score: Callable[[Completions], Sequence], name: str) -> None:
        self.spec, self.score, self.name, self.weight = spec, score, name, spec.weight

    def __call__(self, batch: Completions) -> list[float | None]:
        values = self.score(batch)
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(batch.texts):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"reward {self.name} returned {got} for {len(batch.texts)} completions; it must return "
                            "one number (or None) per completion")
        return [checked_value(value, self.name) for value in values]


def reward_table(rewards: list[Reward], batch: Completions) -> tuple[torch.Tensor, torch.Tensor]:
    """(completions, rewards) values with NaN for None, and per completion their weighted sum (NaN where no
    reward had an opinion), float64."""
    values = torch.tensor([[float("nan") if v is None else v for v in reward(batch)] for reward in rewards],
                          dtype=torch.float64).T
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float64)
    total = (values * weights).nansum(1)
    total[values.isnan().all(1)] = float("nan")
    return values, total


def checked_value(value: object, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise UserError(f"reward {name} returned {type(value).__name__} {str(value)[:60]!r}; a reward must be a "
                        "number, or None for no opinion")
    if not math.isfinite(value):
        raise UserError(f"reward {name} returned {value}; a reward must be a finite number, or None for no opinion")
    return float(value)


def load_rewards(specs: list[RewardSpec], full_text: bool, device: torch.device) -> list[Reward]:
    return [load_function(spec, full_text) if spec.function else load_scorer(spec, full_text, device)
            for spec in specs]


def load_function(spec: RewardSpec, full_text: bool) -> Reward:
    """Import the function the recipe names; its shape decides how it is called."""
    source, name = spec.function.rsplit(":", 1)
    where = f"rl.rewards function {spec.function!r}"
    if source.endswith(".py"):
        unique = "finetune_reward_" + hashlib.sha256(source.encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(unique, source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as exc:
            raise UserError(f"{where}: module {exc.name!r} not found") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{where}: {Path(source).name} has no function {name!r}")
    parameters = inspect.signature(function).parameters.values()
    keywords = any(p.kind is p.VAR_KEYWORD for p in parameters)
    if keywords or any(p.name == "completions" for p in parameters):
        accepted = {p.name for p in parameters}

        def batch(completions: Completions) -> Sequence:
            columns = {key: [row.get(key) for row in completions.columns]
                       for key in dict.fromkeys(k for row in completions.columns for k in row)
                       if keywords or key in accepted}
            return function(prompts=completions.prompts, completions=completions.trl_completions(), **columns)

        return Reward(spec, batch, name)
    if len([p for p in parameters if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]) != 1:
        raise UserError(f"{where}: a reward function takes (text) or (prompts, completions, **columns)")
    return Reward(spec, lambda completions: [function(text) for text in completions.reward_texts(full_text)], name)


def load_scorer(spec: RewardSpec, full_text: bool, device: torch.device) -> Reward:
    """A reward model scores each text (closed by EOS, as it was trained); a classification run gives the
    probability of the label's word after its prompt template, among its label words."""
    folder = Path(spec.model)
    model = load_final(folder).to(device).eval()
    tokenizer = load_tokenizer(str(folder))
    name = f"{folder.parent.name}" + (f":{spec.label}" if spec.label else "")
    if is_reward_model(model):
        if spec.label is not None:
            raise UserError(f"rl.rewards model {folder} is a reward model (one score): remove 'label'")
        return Reward(spec, lambda batch: _reward_model_scores(model, tokenizer, batch.reward_texts(full_text)), name)
    fmt = data_format(trained_recipe(Recipe(name="scorer"), folder).data)
    names = fmt.label_names()
    if not names:
        raise UserError(f"rl.rewards model {folder} is neither a reward model nor a classification run's final/")
    if spec.label not in names:
        raise UserError(f"rl.rewards model {folder}: 'label' must be one of its labels {names}, got {spec.label!r}")
    label_ids = encode_texts(tokenizer, fmt.label_words())
    index, reserve = names.index(spec.label), max(len(ids) for ids in label_ids)
    window = context_length(model)

    @torch.no_grad()
    def probabilities(batch: Completions) -> list[float]:
        prompts = [fmt.user_prompt(text) for text in batch.reward_texts(full_text)]
        contexts = [fit_prompt(ids, window, reserve) for ids, _ in encode_segments(tokenizer, prompts)]
        scores = label_loglikelihoods(model, contexts, label_ids, tokenizer.pad_token_id)
        return scores.double().softmax(-1)[:, index].tolist()

    return Reward(spec, probabilities, name)


@torch.no_grad()
def _reward_model_scores(model: torch.nn.Module, tokenizer, texts: list[str]) -> list[float]:
    window = context_length(model)
    device = next(model.parameters()).device
    rows = [scoring_row([], fit_prompt(ids + [tokenizer.eos_token_id], window, 0))
            for ids in encode_texts(tokenizer, texts)]
    batch = {key: value.to(device) for key, value in PairCollator(tokenizer.pad_token_id)(rows).items()}
    return sequence_rewards(model, batch).tolist()
