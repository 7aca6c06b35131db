"""The Trainer of `train.objective: kto` on rated completions (FeedbackCollator batches).

Per step: the policy's per-sequence log-probabilities of the batch's completions (with gradients) and, without
gradients, of the mismatched sequences (each prompt followed by another example's completion), both again under
the reference; KTO's reference point z is the mean log-ratio of the mismatched sequences over every process,
clamped at 0 (objectives.kl_estimate). All log-probabilities come from the chunked loss (loss.sequence_logps), so
the batch's full logits never exist. Logged as TRL's KTOTrainer logs them: rewards/chosen and logps/chosen over the
desirable completions, rewards/rejected and logps/rejected over the undesirable ones, rewards/margins (their
difference) and kl (z); each a mean over the completions since the last log, summed over processes before dividing.
"""

from __future__ import annotations

import torch

from finetune.loss import sequence_logps
from finetune.objectives import kl_estimate, kto_losses
from finetune.preference_trainer import PreferenceTrainer, sequence_rows


class FeedbackTrainer(PreferenceTrainer):
    def batch_values(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per completion of this process's batch, the KTO loss; and the values logged, one per completion (NaN
        where a value does not apply: rewards/chosen of an undesirable completion), and the batch's KL estimate."""
        chunk = self._chunk()
        policy, _ = sequence_logps(model, batch, chunk)
        with torch.no_grad():
            policy_mismatched, _ = sequence_logps(model, batch["kl"], chunk)
        with self.reference() as reference:
            reference_logps, _ = sequence_logps(reference, batch, chunk)
            reference_mismatched, _ = sequence_logps(reference, batch["kl"], chunk)
        shift = (policy_mismatched - reference_mismatched).double()
        total, count = self.accelerator.reduce(torch.stack([shift.sum(), shift.new_tensor(len(shift))]), "sum")
        kl = kl_estimate(total, count).to(policy.dtype)
        desirable = batch["desirable"]
        losses, rewards = kto_losses(self.preference, policy, reference_logps, desirable, kl)
        logps, nan = policy.detach(), torch.tensor(float("nan"), device=policy.device)
        return losses, {"rewards/chosen": rewards.where(desirable, nan),
                        "rewards/rejected": rewards.where(~desirable, nan),
                        "logps/chosen": logps.where(desirable, nan), "logps/rejected": logps.where(~desirable, nan),
                        "kl": kl[None]}

    def item_rows(self, batch: dict) -> torch.Tensor:
        return sequence_rows(batch["sequence_ids"])
