"""The Trainer the train stage runs: its loss never materializes the batch's full logits, and its validation
loss is a token-weighted mean over the whole split."""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from finetune.distributed import allow_fsdp_on_cpu, import_deepspeed_only_if_used
from finetune.loss import chunked_nll_sum, target_nll


class PackedTrainer(Trainer):
    """Trainer whose training loss never materializes the batch's full logits (`train.loss_chunk`), and whose
    evaluation loss is the mean over all target tokens of the split, so it does not depend on the evaluation
    batch size (Trainer's own loop averages per-batch means)."""

    def __init__(self, *args, loss_chunk: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk

    def create_accelerator_and_postprocess(self) -> None:
        allow_fsdp_on_cpu()
        super().create_accelerator_and_postprocess()
        import_deepspeed_only_if_used(self.is_deepspeed_enabled)

    def _chunked(self) -> bool:
        """The chunked loss reads the output embedding outside the model's forward: not under FSDP or DeepSpeed,
        whose parameters are sharded there; not with label smoothing, which Trainer applies to full logits."""
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        return self.loss_chunk is not None and not sharded and self.label_smoother is None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._chunked():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], output_hidden_states=True,
                        logits_to_keep=1)
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        total, count = chunked_nll_sum(outputs.hidden_states[-1], weight, inputs["labels"], self.loss_chunk)
        loss = (total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))).float()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does: gradients are averaged over processes
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        model = self.model_wrapped  # DDP / FSDP / DeepSpeed engine during training, the plain model otherwise
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        count = rows = 0
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with self.compute_loss_context_manager():
                nll = target_nll(model, batch, self.loss_chunk if self._chunked() else None)
            sums, counts = self.accelerator.gather_for_metrics(nll)
            total += sums.sum().cpu()
            count += int(counts.sum())
            rows += len(sums)
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics = {f"{metric_key_prefix}_loss": (total / max(count, 1)).item()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=rows)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Checkpoints store GPT-2's tied lm_head once, as wte: transformers 5.23 reports it as a missing key
        when loading the best checkpoint, although the tie holds. Report only keys that are really missing."""
        tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)
