"""GRPO and RLOO on sampled completions, written as TRL 1.16 computes them (GRPOTrainer with loss_type "grpo",
RLOOTrainer), for completions grouped by prompt: rewards and advantages are (prompts, group size), per-token
tensors are (completions, completion positions) with `mask` marking the completion's tokens.

- GRPO (Shao et al. 2024): advantage = (r - mean of the group) / (std of the group + 1e-4) (unscaled with
  `scale_rewards: false`); per token, -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * ratio * KL,
  where KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 and the ratio (1 in value on-policy, but not in
  its gradient) makes its gradient the unbiased reverse-KL one (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by
  default); the loss is the mean over completions of each one's token mean.
- RLOO (Ahmadian et al. 2024): the reward first pays beta times the sequence's log-ratio to the reference
  (sum over its tokens of old - ref); advantage = r - the mean of the other completions of its group (optionally
  standardised over the batch, all processes' completions); loss = mean over completions of
  -min(ratio * A, clip(ratio) * A) with the sequence's probability ratio.

Standard deviations are unbiased, as torch.std. A reward of NaN (no reward had an opinion) is left out of its
group's statistics and gets advantage 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

STD_FLOOR = 1e-4  # TRL's


class TokenLogps(NamedTuple):
    """Per completion token: the policy's log-probabilities (with gradients), the sampling policy's (`old`, no
    gradients) and the reference's; `mask` is 1 on completion tokens, 0 on padding."""
    policy: torch.Tensor
    old: torch.Tensor
    reference: torch.Tensor
    mask: torch.Tensor


def nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (NaN where fewer than two values are left)."""
    mean = values.nanmean(dim, keepdim=True)
    count = (~values.isnan()).sum(dim, keepdim=True)
    variance = ((values - mean) ** 2).nansum(dim, keepdim=True) / (count - 1)
    return variance.sqrt().squeeze(dim)


def grpo_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    advantages = rewards - rewards.nanmean(1, keepdim=True)
    if scale:
        advantages = advantages / (nanstd(rewards, 1)[:, None] + STD_FLOOR)
    return advantages.nan_to_num(nan=0.0)


def rloo_advantages(rewards: torch.Tensor, normalize: bool,
                    gather: Callable[[torch.Tensor], torch.Tensor] = lambda values: values) -> torch.Tensor:
    """`normalize` standardises over the whole batch: `gather` returns every process's values of a tensor."""
    scorable = (~rewards.isnan()).sum(1, keepdim=True)
    baseline = (rewards.nansum(1, keepdim=True) - rewards) / (scorable - 1)
    advantages = rewards - baseline
    if normalize:
        batch = gather(advantages).flatten()
        advantages = (advantages - batch.nanmean()) / (nanstd(batch, 0) + STD_FLOOR)
    return advantages.nan_to_num(nan=0.0)


def k3_kl(logps: TokenLogps) -> torch.Tensor:
    """Per token: the k3 estimate of KL(policy || reference) (non-negative)."""
    delta = logps.reference - logps.policy
    return torch.exp(delta) - delta - 1


def sequence_log_ratio(logps: TokenLogps) -> torch.Tensor:
    """Per completion: log pi_old(completion) - log pi_ref(completion), RLOO's KL penalty (no gradients)."""
    return ((logps.old - logps.reference) * logps.mask).sum(1)


def _clipped(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


def grpo_loss(logps: TokenLogps, advantages: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """`advantages` per completion (flattened groups)."""
    ratio = torch.exp(logps.policy - logps.old)
    per_token = _clipped(ratio, advantages[:, None], epsilon)
    if beta:
        per_token = per_token + beta * k3_kl(logps) * ratio
    mask = logps.mask
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def rloo_loss(logps: TokenLogps, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`advantages` per completion (flattened groups, the KL penalty already in the rewards)."""
    ratio = torch.exp(((logps.policy - logps.old) * logps.mask).sum(1))
    return _clipped(ratio, advantages, epsilon).mean()
