"""A preference policy (train.objective dpo, ipo, simpo, kto) against its reference in `finetune eval`: completions
sampled from both for the same held-out prompts, and an estimate of KL(tuned || reference) from the tuned model's
own samples.

Prompt i (of the first `eval.policy.prompts` validation pairs) is sampled with seed `eval.seed + i` by both
models, through the generation engine, by plain ancestral sampling: temperature 1, no top-k, top-p or repetition
penalty, so the samples follow the model's own distribution, which is what the estimate needs. For samples y_i of
p_tuned(. | x_i), KL(tuned || reference) = E[log p_tuned(y | x) - log p_ref(y | x)]; the estimate is the mean over
samples of that difference, each term summed over the sampled tokens (the EOS that ended a sample included; a
sample cut at max_new_tokens is scored as far as it goes), with its standard error. Both log-probabilities are
scored afresh (loss.target_nll, float64 sums), one sample per right-padded row with positions from 0.

Prompts are dealt to processes in whole batches of `eval.batch_size`, so a batch holds the same prompts for any
number of processes and the samples and figures do not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finetune.collate import PackedCollator
from finetune.generation.engine import Engine, Request
from finetune.generation.params import SamplingParams
from finetune.loss import target_nll
from finetune.packing import IGNORE
from finetune.rl.config import POLICY_OBJECTIVES

def is_policy(objective: str) -> bool:
    """A model tuned on preferences that generates (not a reward model, not supervised fine-tuning)."""
    return objective in POLICY_OBJECTIVES


def ancestral(max_new_tokens: int, seed: int) -> SamplingParams:
    """The model's own distribution: temperature 1, nothing cut off or penalised."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                          stop=(), seed=seed)


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # the sampled tokens, with the EOS that ended the sample if one did
    text: str


def sample(model: torch.nn.Module, tokenizer, prompts: list[list[int]], seeds: list[int],
           max_new_tokens: int) -> list[Completion]:
    """One completion of each prompt (token ids, fitted to the context), decoded together; prompt k with seeds[k]."""
    eos = tokenizer.eos_token_id
    engine = Engine(model, {eos}, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    requests = [Request(ids, ancestral(max_new_tokens, seed)) for ids, seed in zip(prompts, seeds)]
    engine.run(requests)
    return [Completion(r.prompt_ids, r.token_ids + ([eos] if r.finish_reason == "stop" else []), r.text)
            for r in requests]


@torch.no_grad()
def completion_logps(model: torch.nn.Module, completions: list[Completion], pad_token_id: int,
                     chunk: int | None) -> list[float]:
    """log p(completion | prompt) under `model` for each completion (float64 sums over its tokens), all in one
    batch: prompt + completion per row, right-padded, positions from 0, only the completion's tokens targets."""
    rows = [{"input_ids": c.prompt_ids + c.ids, "labels": [IGNORE] * len(c.prompt_ids) + c.ids,
             "position_ids": list(range(len(c.prompt_ids) + len(c.ids)))} for c in completions]
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in PackedCollator(pad_token_id)(rows).items()}
    nll, _ = target_nll(model, batch, chunk)
    return (-nll).tolist()


def kl_figures(log_ratios: list[float]) -> dict:
    """kl_to_reference (the mean of log p_tuned - log p_ref over the tuned model's samples), its standard error
    (None for fewer than 2 samples) and the sample count."""
    n = len(log_ratios)
    mean = math.fsum(log_ratios) / n
    stderr = math.sqrt(math.fsum((x - mean) ** 2 for x in log_ratios) / (n - 1) / n) if n > 1 else None
    return {"kl_to_reference": mean, "kl_to_reference_stderr": stderr, "kl_samples": n}
