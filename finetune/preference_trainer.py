"""The Trainer of the preference objectives (`train.objective`: dpo, ipo, simpo, reward) on packed pair rows.

Each row holds whole pairs (chosen, then rejected; positions restarting per sequence, so no sequence sees
another); per-sequence log-probabilities of the response tokens come from the chunked loss (loss.sequence_logps),
so the batch's full logits never exist. The reference is the model with its LoRA adapter switched off (no
second copy), or for full fine-tuning a frozen copy of the base taken before training, which works for a
from-scratch `model.init` base as for a Hub model.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from peft import PeftModel

from finetune.loss import sequence_logps
from finetune.objectives import PairLogps, needs_reference, pair_losses, pair_metrics
from finetune.recipe import PreferenceConfig
from finetune.reward import reward_losses, sequence_rewards
from transformers.trainer_utils import EvalLoopOutput

from finetune.trainer import PackedTrainer


def disable_dropout(model: torch.nn.Module) -> None:
    """Policy and reference scored alike (as TRL's `disable_dropout`, on by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None) -> PairLogps:
    return PairLogps.from_sequences(*sequence_logps(model, batch, chunk))


def reference_context(model: torch.nn.Module):
    """The adapter switched off for a PEFT model (its base is the reference); nothing otherwise."""
    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


class PreferenceTrainer(PackedTrainer):
    """PackedTrainer with a preference loss over PairCollator batches; logs rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (means over the pairs since the last log)
    for training and for validation."""

    def __init__(self, *args, objective: str, preference: PreferenceConfig,
                 reference_model: torch.nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.objective, self.preference = objective, preference
        self.reference_model = reference_model.to(self.args.device) if reference_model is not None else None
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: Trainer divides by accumulation
        self._pending: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _chunk(self) -> int | None:
        return self.loss_chunk if self._chunked() else None

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The reference model (the frozen copy, or this model with its adapter off), to score without gradients."""
        model = self.reference_model if self.reference_model is not None else self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), reference_context(model):
            yield model

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> PairLogps | None:
        if not needs_reference(self.objective):
            return None
        with self.reference() as model:
            return pair_logps(model, batch, self._chunk())

    def pair_results(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """(the policy's PairLogps, or None for a reward model; the PairLosses)"""
        if self.objective == "reward":
            return None, reward_losses(self.preference, sequence_rewards(model, batch))
        policy = pair_logps(model, batch, self._chunk())
        result = pair_losses(self.objective, self.preference, policy, self.reference_logps(batch))
        return policy, result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy, result = self.pair_results(model, inputs)
        for key, values in pair_metrics(policy, result).items():
            self._pending[key].append(self.accelerator.gather(values))
        loss = result.losses.mean()
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._pending:
            logs.update({key: torch.cat(values).mean().item() for key, values in self._pending.items()})
            self._pending.clear()
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        """The mean loss and metrics over all validation pairs (pair-weighted, whatever the batch size)."""
        model = self.model_wrapped
        model.eval()
        values: dict[str, list[torch.Tensor]] = defaultdict(list)
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.compute_loss_context_manager():
                policy, result = self.pair_results(model, batch)
            for key, value in {"loss": result.losses.detach(), **pair_metrics(policy, result)}.items():
                values[key].append(self.accelerator.gather_for_metrics(value))
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        pairs = torch.cat(values["loss"])
        metrics = {f"{metric_key_prefix}_{key}": torch.cat(value).mean().item() for key, value in values.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(pairs))
