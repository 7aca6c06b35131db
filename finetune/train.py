"""The train stage: prepared data + base model (+ LoRA) -> a Trainer run -> checkpoints/, final/, metrics.jsonl,
loss.png.

One process or many: `accelerate launch --multi_gpu --num_processes N -m finetune train RECIPE` runs the same
code on every rank. Prepared data is made once before the launch (`make train` runs `finetune prepare` first);
ranks only check that it is current. A run resumes from its newest complete checkpoint (`train.resume: auto`),
with optimizer, scheduler, data order and RNG state, so a killed run ends where an uninterrupted one would; a
finished run trained again trains nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import DistributedType
from safetensors import safe_open
from transformers import (EarlyStoppingCallback, PreTrainedTokenizerBase, ProgressCallback, Trainer,
                          TrainingArguments, set_seed)
from transformers.trainer_utils import EvalLoopOutput, IntervalStrategy, SchedulerType

from finetune.callbacks import (FollowNewSchedule, MetricsFile, RunFinished, StopWhenFinished, Throughput,
                                TokenProgress)
from finetune.chat_template import save_tokenizer
from finetune.collate import PackedCollator
from finetune.distributed import (allow_fsdp_on_cpu, import_deepspeed_only_if_used, is_main_process, main_print,
                                  process_group, same_on_every_rank, same_prepared_data, use_cpu)
from finetune.errors import UserError, writing
from finetune.loss import chunked_nll_sum
from finetune.modeling import (apply_lora, base_config, context_length, load_base_model, parameter_counts,
                               without_kv_cache)
from finetune.packing import IGNORE
from finetune.plots import plot_loss
from finetune.prepare import ensure_prepared, load_prepared, load_prepared_tokenizer, run_lock
from finetune.recipe import DEFAULT_DDP_TIMEOUT_S, STAGE_ARGUMENTS, TRAINING_ARGUMENTS, Recipe, save_recipe
from finetune.run_folder import RECIPE_FILE, RunFolder
from finetune.tracking import environment as tracking_environment, guard as guard_trackers

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SCHEDULES = [schedule.value for schedule in SchedulerType]


def train(recipe: Recipe) -> Trainer:
    """Run the stage; returns the Trainer, whose model is the final one (the best checkpoint when evaluating).
    Two runs of one recipe at once would share checkpoints/ and metrics.jsonl: the main process holds a lock."""
    with process_group(recipe.train.extra.get("ddp_timeout", DEFAULT_DDP_TIMEOUT_S)) as state, tracking_environment(recipe), \
            run_lock(recipe, "train") if is_main_process() else nullcontext():
        return _train(recipe, state)


def _train(recipe: Recipe, state: PartialState) -> Trainer:
    check_before_any_work(recipe)
    run = recipe.run
    if is_main_process():
        from_scratch_adapter = [run.base] if recipe.model.init is not None and recipe.lora is not None else []
        run.claim(run.checkpoints, run.final, run.final.with_name("final.tmp"), run.metrics, run.loss_plot,
                  *from_scratch_adapter)
    manifest = ensure_prepared(recipe, state.num_processes)
    same_prepared_data(state, manifest["fingerprint"])
    identity = run_identity(recipe, manifest)
    resume = resume_checkpoint(recipe, identity)
    # Decided before the collective below: past it, the main process may be replacing checkpoints/ as others read.
    start_over = resume is None or newest_checkpoint(recipe.run.checkpoints) is None
    same_on_every_rank(state, "checkpoint to resume from", str(resume),
                       "keep checkpoints on storage every node reads, or write them on each node with "
                       "train.extra.save_on_each_node=true")
    args = run_arguments(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    trainer = build_trainer(recipe, model, tokenizer, args)
    check_final_is_loadable(trainer)
    if state.num_processes > 1:
        main_print(f"train: {state.num_processes} processes, {trainer.accelerator.distributed_type.value} over "
                   f"{state.backend}")
    if start_over:
        clear_checkpoints(trainer, recipe.run, identity)
    if resume is not None and is_main_process():
        print(f"train: resuming from {resume} (train.resume=never starts over)")
    try:
        with writing(recipe.run.checkpoints):
            trainer.train(resume_from_checkpoint=resume)
    except RunFinished as finished:
        main_print(f"train: {resume} already reached the last step ({finished}): nothing to train, writing final/ "
                   "from the run's checkpoints. Raise train.max_steps or train.epochs to train on, or set "
                   "train.resume=never to start over")
        if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TokenProgress):
                callback.close()
    with writing(recipe.run.final):
        save_final(recipe, trainer, tokenizer)
    return trainer


def check_final_is_loadable(trainer: Trainer) -> None:
    """DeepSpeed ZeRO-3 keeps only shards of the weights: unless told to gather them when saving, Trainer would
    write final/ as DeepSpeed shards that no other stage or library loads."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise UserError("DeepSpeed ZeRO-3 without gathering the weights at save time would leave final/ without a "
                        "loadable model: set 'zero3_save_16bit_model: true' under deepspeed_config in the accelerate "
                        "config (recipes/accelerate/deepspeed-zero3.yaml does), or pass --zero3_save_16bit_model true")


def check_before_any_work(recipe: Recipe) -> None:
    """Fail before prepare on a learning-rate schedule transformers does not have (checked here, not when the
    recipe loads: that would import transformers into every load), a base that is not a model, or a block size
    the model cannot take."""
    if recipe.train.scheduler not in SCHEDULES:
        raise UserError(f"{recipe.source}: 'train.scheduler' = {recipe.train.scheduler!r} is not a learning-rate "
                        f"schedule; use one of: {', '.join(SCHEDULES)}")
    limit = context_length(base_config(recipe))
    if recipe.data.block_size > limit:
        raise UserError(f"{recipe.source}: 'data.block_size' = {recipe.data.block_size} is above the model's "
                        f"context length (n_positions = {limit}); use at most {limit}")


def newest_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` under `folder` that was completely written: trainer_state.json present
    (Trainer writes it last) and every weight and state file readable to its end. Newer, incomplete ones (a
    kill or a full disk during the save) are skipped, saying so."""
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        main_print(f"train: skipping {path}: {problem}")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it can). safetensors files are checked
    against their header (a truncated one no longer holds the data it declares), torch's zip files for their
    central directory (written last)."""
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is damaged or truncated"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(file).close()
        except Exception as exc:  # noqa: BLE001 - any failure to read it means the file is damaged
            return f"{file.name} is damaged or truncated ({type(exc).__name__})"
    return None


# train.* keys a resumed run may change: how long it runs and what it logs and keeps, not what it computes.
RESUMABLE_KEYS = ("epochs", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                  "early_stopping_patience", "resume", "dataloader_workers", "eval_batch_size", "report_to", "run_name")


def run_identity(recipe: Recipe, manifest: dict) -> dict:
    """What a checkpoint's trajectory depends on: the prepared data and the model, tokenizer, LoRA and train
    settings (less RESUMABLE_KEYS)."""
    raw = recipe.to_dict()
    train_section = {k: v for k, v in raw["train"].items() if k not in RESUMABLE_KEYS}
    return json.loads(json.dumps({"prepared data": manifest["fingerprint"], "model": raw["model"],
                                  "tokenizer": raw["tokenizer"], "lora": raw["lora"], "train": train_section},
                                 default=str))


def resume_checkpoint(recipe: Recipe, identity: dict) -> str | None:
    """`train.resume`: auto (newest checkpoint of this run, if any, and only if it was trained from the same data
    and settings), never, or a checkpoint (or folder of them), resumed as asked."""
    mode = recipe.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        folder = recipe.run.checkpoints
        found = newest_checkpoint(folder)
        if found is None:
            return None
        record = recipe.run.identity
        recorded = json.loads(record.read_text()) if record.is_file() else None
        if recorded != identity:
            changed = f"unknown (no {record})" if recorded is None else ", ".join(
                key for key in identity if recorded.get(key) != identity.get(key))
            raise UserError(f"{recipe.source}: {folder} holds a run of other data or settings (changed: {changed}); "
                            "set train.resume=never to start over, or train.resume=<checkpoint> to continue it "
                            "anyway")
        return str(found)
    path = Path(mode)
    found = path if (path / "trainer_state.json").is_file() else newest_checkpoint(path)
    if found is None:
        raise UserError(f"{recipe.source}: 'train.resume' = {mode!r} holds no checkpoint (no trainer_state.json in "
                        "it or in a checkpoint-N folder under it); use auto, never or a checkpoint folder")
    return str(found)


def clear_checkpoints(trainer: Trainer, run: RunFolder, identity: dict) -> None:
    """A fresh run must not leave an older run's checkpoints for `auto` to pick up; it records what it trains
    from, so that `auto` resumes only the same run."""
    if is_main_process():
        if newest_checkpoint(run.checkpoints) is not None:
            print(f"train: starting over: removing the old checkpoints in {run.checkpoints}")
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        run.checkpoints.mkdir(parents=True)
        run.identity.write_text(json.dumps(identity, indent=1))
    trainer.accelerator.wait_for_everyone()


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The base model, with a LoRA adapter unless `lora: null` (full fine-tuning); prints what is trained."""
    set_seed(recipe.train.seed)
    model = load_base_model(recipe, tokenizer)
    if recipe.lora is None:
        trainable, total = parameter_counts(model)
        main_print(f"train: full fine-tuning, {trainable:,} trainable parameters")
        return without_kv_cache(model)
    if recipe.model.init is not None and is_main_process():
        save_initialized_base(model, tokenizer, base_dir(recipe))
    model, matched = apply_lora(model, recipe.lora)
    model.peft_config["default"].base_model_name_or_path = recipe.model.base or str(base_dir(recipe))
    trainable, total = parameter_counts(model)
    main_print(f"train: LoRA r={recipe.lora.r} alpha={recipe.lora.alpha:g} on {len(matched)} modules: "
               + ", ".join(group_module_names(matched)))
    main_print(f"train: {trainable:,} trainable parameters of {total:,} ({trainable / total:.3%})")
    return without_kv_cache(model)


def base_dir(recipe: Recipe) -> Path:
    """Where a from-scratch model is saved before LoRA, so the adapter has a base to point at."""
    return recipe.run.base.resolve()


def save_initialized_base(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    model.config.use_cache = True
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"train: saved the initialized base model to {folder} (the LoRA adapter's base)")


def group_module_names(names: list[str]) -> list[str]:
    """`transformer.h.0.attn.c_attn` ... `transformer.h.11.attn.c_attn` -> `transformer.h.[0-11].attn.c_attn`."""
    layers: dict[str, list[int]] = defaultdict(list)
    for name in names:
        match = re.match(r"^(.*?\.)(\d+)(\..*)$", name)
        if match:
            layers[f"{match.group(1)}{{}}{match.group(3)}"].append(int(match.group(2)))
        else:
            layers[name] = []
    def span(ids: list[int]) -> str:
        contiguous = len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1))
        return f"[{ids[0]}-{ids[-1]}]" if contiguous else f"[{','.join(map(str, ids))}]" if len(ids) > 1 else str(ids[0])

    return [pattern.replace("{}", span(sorted(ids))) if ids else pattern for pattern, ids in layers.items()]


def training_arguments(recipe: Recipe, evaluate: bool) -> TrainingArguments:
    """TrainingArguments from the documented `train.*` core, plus `train.extra` passed through: extra may change
    the defaults below, not what the core or the stage itself decides."""
    cfg = recipe.train
    eval_steps = cfg.save_steps if cfg.eval_steps is None else cfg.eval_steps
    stage = dict(
        output_dir=str(recipe.run.checkpoints),
        warmup_steps=cfg.warmup_ratio or cfg.warmup_steps,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        save_strategy="steps",
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        load_best_model_at_end=evaluate,
        metric_for_best_model="eval_loss" if evaluate else None,
        greater_is_better=False if evaluate else None,
        include_num_input_tokens_seen="all",  # for tokens/s
        remove_unused_columns=False,  # the collator builds exactly the model's inputs
        run_name=cfg.run_name or recipe.name,
    )
    defaults = dict(
        logging_first_step=True,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # LoRA or not, every trainable GPT-2 parameter is used in forward
        use_cpu=use_cpu(),  # also: bf16 runs on the CPU only with use_cpu
    )
    assert set(stage) == set(STAGE_ARGUMENTS)  # train.extra was checked against that list when the recipe loaded
    kwargs = {**{arg: getattr(cfg, key) for key, arg in TRAINING_ARGUMENTS.items()}, **defaults, **cfg.extra, **stage}
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:
        raise UserError(f"{recipe.source}: the train section is inconsistent: {exc}") from None


def run_arguments(recipe: Recipe) -> TrainingArguments:
    """The run's TrainingArguments (made before the model loads, so a bad train.* value fails fast): it evaluates
    when the prepared data has a validation split, unless train.eval_steps is 0."""
    validation = (recipe.run.prepared / "validation").is_dir()
    if recipe.train.early_stopping_patience and not validation:
        raise UserError(f"{recipe.source}: 'train.early_stopping_patience' needs evaluation, but the prepared data "
                        "has no validation split")
    return training_arguments(recipe, validation and recipe.train.eval_steps != 0)


def build_trainer(recipe: Recipe, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                  args: TrainingArguments | None = None) -> Trainer:
    cfg = recipe.train
    args = args or run_arguments(recipe)
    evaluate = args.eval_strategy != IntervalStrategy.NO
    throughput = Throughput()
    trainer = PackedTrainer(
        loss_chunk=cfg.loss_chunk,
        model=model, args=args, data_collator=PackedCollator(tokenizer.pad_token_id),
        train_dataset=load_prepared(recipe, "train"),
        eval_dataset=load_prepared(recipe, "validation") if evaluate else None,
        callbacks=[StopWhenFinished(), FollowNewSchedule(), throughput, MetricsFile(recipe.run.metrics)],
    )  # no processing_class: Trainer would copy pad = EOS into the model config (final/ gets the tokenizer)
    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokenProgress(throughput))
    if cfg.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    guard_trackers(trainer)
    return trainer


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
            labels = batch["labels"]
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            targets = labels[:, 1:]
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                     reduction="none").view_as(targets)
            sums, counts = self.accelerator.gather_for_metrics((losses.sum(1), targets.ne(IGNORE).sum(1)))
            total += sums.double().sum().cpu()
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


def save_final(recipe: Recipe, trainer: Trainer, tokenizer: PreTrainedTokenizerBase) -> Path:
    """`final/`: the adapter (PEFT format) or the full model (safetensors), the tokenizer and the resolved recipe;
    its config has `use_cache` back on so generation uses a KV cache."""
    run = recipe.run
    final, staging = run.final, run.final.with_name("final.tmp")
    main = is_main_process()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.model.config.use_cache = True
    trainer.save_model(str(staging))
    if main:
        (staging / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle: checkpoints keep it
        save_tokenizer(tokenizer, recipe.data, staging)
        save_recipe(recipe, staging / RECIPE_FILE)
        run.replace(final, staging)
        plot_loss(run.metrics, run.loss_plot)
        print(f"train: wrote {final}" + (f" (best checkpoint: {trainer.state.best_model_checkpoint})"
                                         if trainer.state.best_model_checkpoint else ""))
    trainer.accelerator.wait_for_everyone()
    return final
