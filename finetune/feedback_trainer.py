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
from transformers.trainer_utils import EvalLoopOutput

from finetune.loss import sequence_logps
from finetune.objectives import kl_estimate, kto_losses
from finetune.preference_trainer import PreferenceTrainer


class FeedbackTrainer(PreferenceTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sums: dict[str, torch.Tensor] = {}  # metric -> (sum, count) since the last log, over all processes

    def feedback_results(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per completion of this process's batch, the KTO loss; and the values logged (1-d tensors)."""
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
        logps = policy.detach()
        return losses, {"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                        "logps/chosen": logps[desirable], "logps/rejected": logps[~desirable], "kl": kl[None]}

    def _accumulate(self, sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        """Add each value's sum and count, summed over processes (one collective for all of them)."""
        local = torch.stack([torch.stack([v.double().sum(), torch.tensor(float(v.numel()), dtype=torch.float64,
                                                                         device=v.device)]) for v in values.values()])
        for key, stat in zip(values, self.accelerator.reduce(local, "sum").cpu()):
            sums[key] = sums[key] + stat if key in sums else stat

    @staticmethod
    def _means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        means = {key: (total / count).item() for key, (total, count) in sums.items() if count > 0}
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return means

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, values = self.feedback_results(model, inputs)
        self._accumulate(self._sums, values)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            logs.update(self._means(self._sums))
            self._sums.clear()
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        """The mean loss and metrics over all validation completions (each batch its own z, as in training)."""
        model = self.model_wrapped
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.compute_loss_context_manager():
                losses, values = self.feedback_results(model, batch)
            self._accumulate(sums, {"loss": losses, **values})
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in self._means(sums).items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(sums["loss"][1]))
