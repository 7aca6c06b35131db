"""The preference objectives (`train.objective`) on per-pair log-probabilities, written as their papers and TRL
write them:

- dpo (Rafailov et al. 2023, sigmoid loss; with label smoothing eps the conservative cDPO):
  h = beta * ((logp_c - ref_c) - (logp_r - ref_r)), loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)
- ipo (Azar et al. 2023, eq. 17, log ratios averaged per token as TRL and the IPO authors do):
  loss = ((logp_c - ref_c) / n_c - (logp_r - ref_r) / n_r - 1 / (2 beta))^2
- simpo (Meng et al. 2024, reference-free): loss = -log sigmoid(beta * (logp_c / n_c - logp_r / n_r) - gamma)
- kto (Ethayarajh et al. 2024, eq. 7, on single completions rated desirable or not; TRL's loss_type "kto"): with
  r = logp - ref and z the detached, clamped KL estimate (kl_estimate), a desirable completion's loss is
  w_d * (1 - sigmoid(beta * (r - z))), an undesirable one's w_u * (1 - sigmoid(beta * (z - r)))

The implicit rewards (what metrics.jsonl logs) are beta * (logp - ref) for dpo, ipo and kto, beta * logp / n for
simpo.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from finetune.recipe import PreferenceConfig

REFERENCE_FREE = ("simpo", "reward")


class PairLogps(NamedTuple):
    """Per pair: summed log-probabilities of the chosen and rejected responses' target tokens, and their counts."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def from_sequences(cls, logps: torch.Tensor, counts: torch.Tensor) -> PairLogps:
        """Sequences in pair order (chosen, rejected, chosen, ...) -> per pair."""
        return cls(logps[0::2], logps[1::2], counts[0::2], counts[1::2])


class PairLosses(NamedTuple):
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def needs_reference(objective: str) -> bool:
    return objective not in REFERENCE_FREE


def pair_losses(objective: str, cfg: PreferenceConfig, policy: PairLogps, reference: PairLogps | None) -> PairLosses:
    """The per-pair loss of `objective` and the implicit rewards (detached)."""
    beta = cfg.beta
    if objective == "simpo":
        chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
        rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
        losses = -F.logsigmoid(beta * (chosen - rejected) - cfg.simpo_gamma)
        return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    if objective == "dpo":
        margin = beta * (chosen_ratio - rejected_ratio)
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    elif objective == "ipo":
        delta = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"not a preference objective: {objective}")
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def preference_margins(objective: str, logps: PairLogps) -> torch.Tensor:
    """How much a model itself prefers each chosen response (no reference): the log-probability difference, per
    token for simpo (its reward is length-normalised), summed otherwise. Eval's pair_accuracy and pair_margin."""
    if objective == "simpo":
        return logps.chosen / logps.chosen_tokens.clamp(min=1) - logps.rejected / logps.rejected_tokens.clamp(min=1)
    return logps.chosen - logps.rejected


def pair_metrics(policy: PairLogps | None, result: PairLosses) -> dict[str, torch.Tensor]:
    """Per-pair values of what is logged (averaged over pairs when logged); no logps/* for a reward model."""
    rewards = {"rewards/chosen": result.chosen_rewards, "rewards/rejected": result.rejected_rewards,
               "rewards/margins": result.chosen_rewards - result.rejected_rewards,
               "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float()}
    if policy is None:
        return rewards
    return {**rewards, "logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach()}


def kl_estimate(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the mean of log p - log p_ref over the mismatched (prompt, completion) sequences,
    from their `total` and `count` summed over every process (so z is the same on all), clamped at 0, with no
    gradient."""
    return (total / count.clamp(min=1)).detach().clamp(min=0)


def kto_losses(cfg: PreferenceConfig, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion: the KTO loss (weighted by its label's weight) and the implicit reward (detached)."""
    ratio = policy - reference
    losses = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio))))
    return losses, cfg.beta * ratio.detach()
