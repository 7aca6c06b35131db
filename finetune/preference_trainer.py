"""The Trainer of the preference objectives (`train.objective`: dpo, ipo, simpo, reward) on packed pair rows.

Each row holds whole pairs (chosen, then rejected; positions restarting per sequence, so no sequence sees
another); per-sequence log-probabilities of the response tokens come from the chunked loss (loss.sequence_logps),
so the batch's full logits never exist. The reference is the model with its LoRA adapter switched off (no
second copy), or for full fine-tuning a frozen copy of the base taken before training, which works for a
from-scratch `model.init` base as for a Hub model; with `train.preference.precompute_reference`, its
log-probabilities computed once before training and carried by the batch (finetune/reference_logps.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from peft import PeftModel

from finetune.loss import sequence_logps, sequence_target_counts
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
        self._sums: dict[str, torch.Tensor] = {}  # metric -> (sum, count) since the last log, all processes

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
        if self.preference.precompute_reference:
            return PairLogps.from_sequences(batch["reference_logps"], sequence_target_counts(batch))
        with self.reference() as model:
            return pair_logps(model, batch, self._chunk())

    def pair_results(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """(the policy's PairLogps, or None for a reward model; the PairLosses)"""
        if self.objective == "reward":
            return None, reward_losses(self.preference, sequence_rewards(model, batch))
        policy = pair_logps(model, batch, self._chunk())
        result = pair_losses(self.objective, self.preference, policy, self.reference_logps(batch))
        return policy, result

    def batch_values(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This process's per-item losses (an item is a pair here) and the values logged, one per item."""
        policy, result = self.pair_results(model, batch)
        return result.losses, pair_metrics(policy, result)

    def item_rows(self, batch: dict) -> torch.Tensor:
        """The row of the batch each item is in (a pair's two sequences share one)."""
        return sequence_rows(batch["sequence_ids"])[0::2]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, values = self.batch_values(model, inputs)
        self._accumulate(values)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        """Add each value's sum and count (NaN: not counted) over all processes, whose batches may hold different
        numbers of items."""
        local = torch.stack([torch.stack([v.detach().double().nansum(), (~v.isnan()).double().sum()])
                             for v in values.values()])
        for key, stat in zip(values, self.accelerator.reduce(local, "sum").cpu()):
            self._sums[key] = self._sums[key] + stat if key in self._sums else stat

    @staticmethod
    def _means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        means = {key: (total / count).item() for key, (total, count) in sums.items() if count > 0}
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return means

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            logs.update(self._means(self._sums))
            self._sums.clear()
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        """The mean loss and metrics over all validation items, whatever the batch size and number of processes: per
        batch row, sums and counts, gathered with gather_for_metrics (which drops the rows repeated to even out the
        processes' last batches) before anything is divided."""
        model = self.model_wrapped
        model.eval()
        stats, keys = [], None
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.compute_loss_context_manager():
                losses, values = self.batch_values(model, batch)
            values = {"loss": losses.detach(), **values}
            keys = list(values)
            rows = row_sums(values, self.item_rows(batch), batch["input_ids"].size(0))
            stats.append(self.accelerator.gather_for_metrics(rows).cpu())
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        totals = torch.cat(stats).sum(0)
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in self._means(dict(zip(keys, totals))).items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(totals[0, 1]))


def sequence_rows(sequence_ids: torch.Tensor) -> torch.Tensor:
    """For each sequence of a batch (numbered as PairCollator numbers them), the row it is in."""
    rows = torch.arange(sequence_ids.size(0), device=sequence_ids.device)[:, None].expand_as(sequence_ids)
    inside = sequence_ids >= 0
    out = torch.zeros(int(sequence_ids.max()) + 1, dtype=torch.long, device=sequence_ids.device)
    return out.scatter_(0, sequence_ids[inside], rows[inside])


def row_sums(values: dict[str, torch.Tensor], item_rows: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, values, 2): per batch row, each value's sum and count over the items in that row (NaN: not counted); a
    value that is not one per item (such as KTO's per-batch KL estimate) counts in the first row."""
    out = torch.zeros(rows, len(values), 2, dtype=torch.float64, device=item_rows.device)
    for column, value in enumerate(values.values()):
        value = value.detach().double()
        where = item_rows if len(value) == len(item_rows) else torch.zeros_like(value, dtype=torch.long)
        out[:, column, 0].index_add_(0, where, value.nan_to_num(0.0))
        out[:, column, 1].index_add_(0, where, (~value.isnan()).double())
    return out
