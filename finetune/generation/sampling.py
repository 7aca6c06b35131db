"""The next token of each decoded row, from its logits under its own settings and random generator."""

from __future__ import annotations

import functools

import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from finetune.generation.params import SamplingParams


@functools.lru_cache(maxsize=64)
def _processors(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature > 0:
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(temperature)))
        if top_k > 0:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(float(top_p)))
    return chain


def _probabilities(scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax that survives extreme settings: with a temperature or repetition penalty tiny enough for scores to
    overflow, the +inf scores share the mass; a row with nothing left falls back to its most likely token."""
    scores = scores.nan_to_num(nan=float("-inf"))
    overflow = torch.isposinf(scores)
    scores = torch.where(overflow.any(-1, keepdim=True), torch.where(overflow, 0.0, float("-inf")), scores)
    empty = torch.isneginf(scores).all(-1)
    if empty.any():
        best = torch.nn.functional.one_hot(logits[empty].argmax(-1), scores.size(-1)).bool()
        scores[empty] = torch.where(best, 0.0, float("-inf"))
    return scores.softmax(-1)


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` (`seen`: each row's tokens so far, for the repetition penalty). Rows sharing
    settings are processed together; a greedy row (temperature 0) takes its best token, the others draw from their
    own generator."""
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append(i)
    for key, members in groups.items():
        index = torch.tensor(members, device=logits.device)
        scores = _processors(*key)(seen[index], logits[index])
        if key[0] == 0:
            tokens[index] = scores.argmax(-1)
            continue
        # torch.multinomial(p, 1) draws argmax(p / q), q ~ Exp(1) from the generator: drawn so here, the same tokens
        # and generator states, without its per-call input checks (at GPT-2's vocabulary, row by row, 10x the draw)
        probs = _probabilities(scores, logits[index])
        race = torch.empty_like(probs)
        for j, i in enumerate(members):
            race[j].exponential_(generator=generators[i])
        tokens[index] = (probs / race).argmax(-1)
    return tokens
