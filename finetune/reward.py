"""Reward models (`train.objective: reward`): GPT-2 with a scalar head (GPT2ForSequenceClassification, num_labels=1)
trained on preference pairs with the Bradley-Terry loss of TRL's RewardTrainer:

  loss = -log sigmoid(r_chosen - r_rejected) [+ c * mean((r_chosen + r_rejected)^2), c = center_rewards_coefficient]

A sequence's reward is the head applied to the backbone's final hidden state at its last token (the EOS closing
its response). Pair rows are packed (positions restarting per sequence), so GPT-2's own lookup of the last
non-pad token of each row cannot be used: the last position of each sequence is read here. final/ saves
`pad_token_id: null`, so plain transformers scores one sequence at a time at its last token, as trained.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from finetune.objectives import PairLosses
from finetune.recipe import PreferenceConfig

MASK_ADVICE = "We strongly recommend passing in an `attention_mask`"


class _PackedRowsHaveNoMask(logging.Filter):
    """A reward model's config has a pad id (its forward refuses batches without one), so transformers advises an
    attention mask on every padded batch; packed rows carry none by design (collate.py: the mask comes from the
    position ids). Only that advice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return MASK_ADVICE not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_PackedRowsHaveNoMask())


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a (PEFT-wrapped, DDP-wrapped) GPT2ForSequenceClassification; under PEFT the adapter's
    trained copy, or with the adapter disabled the original."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.score


def last_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Flat indices (into the batch's row-major tokens) of each sequence's last token, in sequence order."""
    flat = sequence_ids.reshape(-1)
    following = torch.cat([flat[1:], flat.new_full((1,), -1)])
    ends = (flat.ne(-1) & flat.ne(following)).nonzero().squeeze(1)
    return ends[flat[ends].argsort()]


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence of a PairCollator batch (chosen, rejected, chosen, ...): the reward (float32, with gradients
    when enabled). The forward runs through the top model (DDP, PEFT); its pooled logits are ignored."""
    outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    output_hidden_states=True)
    hidden = outputs.hidden_states[-1]
    states = hidden.reshape(-1, hidden.size(-1))[last_positions(batch["sequence_ids"])]
    return score_head(model)(states).squeeze(-1).float()


def reward_losses(cfg: PreferenceConfig, rewards: torch.Tensor) -> PairLosses:
    """Per pair: the Bradley-Terry loss (plus TRL's centring term, whose batch mean is the same per pair)."""
    chosen, rejected = rewards[0::2], rewards[1::2]
    losses = -F.logsigmoid(chosen - rejected)
    if cfg.center_rewards_coefficient is not None:
        losses = losses + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return PairLosses(losses, chosen.detach(), rejected.detach())
