"""The Trainer of reward RL (`train.objective: grpo | rloo`) on prepared prompts.

Each step, for every prompt of the batch, `rl.group_size` completions are sampled through the project's batched
engine (finetune/generation: KV cache, the sampling code of generate and serve), each with its own seed derived
from train.seed, the step and the prompt, so a resumed run samples what an uninterrupted one samples. The rewards
score them; the completions are scored again with gradients (left-padded prompts with position ids taken from the
attention mask, as GPT-2's learned positions need; the EOS that ends a completion is a target although it is also
the pad token) and by the reference: the model with its LoRA adapter switched off, or a frozen copy of the base for
full fine-tuning. The loss is GRPO's or RLOO's (finetune/rl/objectives.py).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset

from finetune.generation.engine import Engine, Request
from finetune.generation.params import SamplingParams
from finetune.loss import token_logps
from finetune.packing import IGNORE
from finetune.preference_trainer import reference_context
from finetune.rl.config import RLConfig
from finetune.rl.objectives import (TokenLogps, grpo_advantages, grpo_loss, k3_kl, nanstd, rloo_advantages, rloo_loss,
                                    sequence_log_ratio)
from finetune.rl.rewards import Reward, completions_of, reward_table
from finetune.store import TokenStore
from finetune.trainer import PackedTrainer


class PromptRows(Dataset):
    """The prepared prompts (one per row of a `prompt`-format store) with their index into the records."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "input_ids": self.store[index]["input_ids"]}


def collate_prompts(rows: list[dict]) -> dict[str, torch.Tensor]:
    """The batch's prompt indices, and its prompts (right-padded with -1) for Trainer's count of input tokens."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
    return {"index": torch.tensor([row["index"] for row in rows]), "input_ids": ids}


def rollout_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{prompt}:{sample}".encode(), digest_size=8).digest(), "big")


def decode(tokenizer, ids: list[int]) -> str:
    """A completion's or prompt's text as the rewards read it: special tokens and spaces kept as generated."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded, completions right-padded after them; the completions' tokens are the labels; position
    ids count the attended tokens only, so padding moves no token's position."""
    width, length = max(len(p) for p in prompts), max(max(len(c) for c in completions), 1)
    ids = torch.full((len(prompts), width + length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = torch.tensor(prompt + completion, dtype=torch.long)
        start = width - len(prompt)
        ids[i, start:start + len(row)] = row
        mask[i, start:start + len(row)] = 1
        labels[i, width:width + len(completion)] = row[len(prompt):]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@dataclass
class Rollout:
    """A batch's prompts (repeated per sample) and completions: token ids (ending with EOS when the model ended
    them), texts, and whether the token budget cut them."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    clipped: list[bool]


class RLTrainer(PackedTrainer):
    """Logs per logging step (means over the completions, groups or tokens since the last log; names as TRL's):
    reward and reward_std, rewards/<name>/mean and rewards/<name>/std per reward, frac_reward_zero_std (groups
    without a learning signal), kl (k3, per token), entropy (per token), completions/mean_length and
    completions/clipped_ratio (completions cut by rl.max_completion_tokens). At step 1 and every rl.sample_log_steps
steps, the first rl.sample_log_count completions of the main process (one per prompt first) with their rewards go
out with the next log as `samples`: a table in metrics.jsonl, the trackers and the console."""

    def __init__(self, *args, train_dataset: TokenStore, objective: str, rl: RLConfig, rewards: list[Reward],
                 tokenizer, reference_model: torch.nn.Module | None = None, **kwargs) -> None:
        self.records = train_dataset.records()
        super().__init__(*args, train_dataset=PromptRows(train_dataset), data_collator=collate_prompts, **kwargs)
        self.objective, self.rl, self.rewards, self.tokenizer = objective, rl, rewards, tokenizer
        self.reference_model = reference_model.to(self.args.device) if reference_model is not None else None
        self.model_accepts_loss_kwargs = False  # the loss is a mean over completions: Trainer divides by accumulation
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))
        self._samples: list[dict] = []

    def _chunk(self) -> int | None:
        return self.loss_chunk if self._chunked() else None

    def sample(self, indices: list[int]) -> Rollout:
        model = self.accelerator.unwrap_model(self.model)
        eos = self.tokenizer.eos_token_id
        engine = Engine(model, {eos}, self.decode)
        params = SamplingParams(max_new_tokens=self.rl.max_completion_tokens, temperature=self.rl.temperature,
                                top_p=1.0, top_k=0, repetition_penalty=1.0, stop=())
        prompts = [[int(t) for t in self.train_dataset[i]["input_ids"]] for i in indices]
        step = self.state.global_step
        requests = [Request(prompt, replace(params, seed=rollout_seed(self.args.seed, step, i, k)))
                    for i, prompt in zip(indices, prompts) for k in range(self.rl.group_size)]
        training = model.training
        model.eval()  # no gradient checkpointing while decoding (dropout is off in training too)
        try:
            engine.run(requests)
        finally:
            model.train(training)
        return Rollout(prompt_ids=[r.prompt_ids for r in requests],
                       completion_ids=[r.token_ids + ([eos] if r.finish_reason == "stop" else []) for r in requests],
                       texts=[r.text for r in requests], clipped=[r.finish_reason == "length" for r in requests])

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def score(self, indices: list[int], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per completion: each reward's value (NaN for None) and their weighted sum."""
        records = [self.records[i] for i in indices for _ in range(self.rl.group_size)]
        return reward_table(self.rewards, completions_of(records, rollout.texts, map(self.decode, rollout.prompt_ids)))

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[TokenLogps, torch.Tensor]:
        policy, entropy = token_logps(model, batch, self._chunk(), entropy=True)
        reference_model = self.reference_model or self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), reference_context(reference_model):
            reference, _ = token_logps(reference_model, batch, self._chunk())
        mask = batch["labels"][:, 1:].ne(IGNORE).float()
        return TokenLogps(policy, policy.detach(), reference, mask), entropy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        indices = inputs["index"].tolist()
        rollout = self.sample(indices)
        per_reward, rewards = self.score(indices, rollout)
        batch = rollout_batch(rollout.prompt_ids, rollout.completion_ids, self.tokenizer.eos_token_id)
        batch = {key: value.to(self.args.device) for key, value in batch.items()}
        logps, entropy = self.logps(model, batch)
        groups = rewards.view(-1, self.rl.group_size).to(self.args.device)
        if self.objective == "rloo":
            penalised = groups - self.rl.beta * sequence_log_ratio(logps).double().view_as(groups)
            advantages = rloo_advantages(penalised, self.rl.normalize_advantages,
                                         self.accelerator.gather).flatten().float()
            loss = rloo_loss(logps, advantages, self.rl.epsilon)
        else:
            advantages = grpo_advantages(groups, self.rl.scale_rewards).flatten().float()
            loss = grpo_loss(logps, advantages, self.rl.beta, self.rl.epsilon)
        self._record(per_reward, rewards, groups, logps, entropy, rollout)
        self._keep_samples(rollout, per_reward, rewards)
        return (loss, None) if return_outputs else loss

    def _record(self, per_reward: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor, logps: TokenLogps,
                entropy: torch.Tensor, rollout: Rollout) -> None:
        mask = logps.mask.bool()
        values = {"reward": rewards, "frac_reward_zero_std": (nanstd(groups, 1) < 1e-8).double(),
                  "kl": k3_kl(logps).detach()[mask], "entropy": entropy[mask],
                  "completions/mean_length": torch.tensor([float(len(c)) for c in rollout.completion_ids]),
                  "completions/clipped_ratio": torch.tensor(rollout.clipped, dtype=torch.float64)}
        values.update({f"rewards/{reward.name}/mean": per_reward[:, i] for i, reward in enumerate(self.rewards)})
        sums = []
        for value in values.values():
            value = value.double().cpu()
            value = value[~value.isnan()]
            sums.append(torch.stack([value.sum(), (value ** 2).sum(), torch.tensor(float(len(value)))]))
        totals = self.accelerator.reduce(torch.stack(sums).to(self.args.device), reduction="sum").cpu()
        for key, total in zip(values, totals):
            self._sums[key] += total

    def _keep_samples(self, rollout: Rollout, per_reward: torch.Tensor, rewards: torch.Tensor) -> None:
        step, every = self.state.global_step + 1, self.rl.sample_log_steps
        if (not every or (step != 1 and step % every) or not self.accelerator.is_main_process
                or any(sample["step"] == step for sample in self._samples)):  # one micro-batch of the step
            return
        groups, size = len(rollout.texts) // self.rl.group_size, self.rl.group_size
        order = [prompt * size + k for k in range(size) for prompt in range(groups)][:self.rl.sample_log_count]
        for i in order:
            scores = [None if value.isnan() else round(value.item(), 4) for value in (rewards[i], *per_reward[i])]
            self._samples.append({"step": step, "prompt": self.decode(rollout.prompt_ids[i]),
                                  "completion": rollout.texts[i], "reward": scores[0],
                                  "rewards": dict(zip((reward.name for reward in self.rewards), scores[1:]))})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._samples:
            logs["samples"], self._samples = self._samples, []
        if "loss" in logs and self._sums:
            for key, (total, squares, count) in self._sums.items():
                if count == 0:
                    continue
                logs[key] = (total / count).item()
                if key == "reward" or key.startswith("rewards/"):
                    variance = (squares - total ** 2 / count) / (count - 1) if count > 1 else torch.tensor(0.0)
                    logs[key.replace("/mean", "/std") if key != "reward" else "reward_std"] = \
                        variance.clamp(min=0).sqrt().item()
            self._sums.clear()
        super().log(logs, start_time)
