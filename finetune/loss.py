"""The causal-LM loss without the batch's full logits.

A GPT-2 step at the real vocabulary (50,257) spends most of its time allocating, faulting in and freeing the
logits tensor: 411 MB at batch 16 x 128, twice with its gradient. Here the final hidden states of the target
positions are multiplied by the output embedding a chunk of positions at a time, each chunk's cross-entropy
summed and the chunk recomputed in backward (activation checkpointing), so at most one chunk of logits exists
at any moment. The result is the transformers loss: the sum of next-token NLL over target positions, divided
by the target count (or Trainer's `num_items_in_batch`, the targets of the whole accumulated batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finetune.packing import IGNORE


def _chunk_nll(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((states @ weight.T).float(), targets, reduction="sum")


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
                    ) -> tuple[torch.Tensor, int]:
    """(sum of the NLL of `labels[:, 1:]` predicted from `hidden[:, :-1]` over target positions, target count).

    `hidden` is the model's final hidden state (batch, time, width), `weight` its output embedding (vocab,
    width); positions whose label is IGNORE are never multiplied out."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets.ne(IGNORE).nonzero().squeeze(1)
    states = hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, keep)
    targets = targets.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        piece = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, states[piece], weight, targets[piece], use_reentrant=False)
        else:
            total = total + _chunk_nll(states[piece], weight, targets[piece])
    return total, len(targets)
