"""The train stage: prepared data + base model (+ LoRA) -> a Trainer run -> checkpoints/, final/, metrics.jsonl,
loss.png.

One process or many: `accelerate launch --multi_gpu --num_processes N -m finetune train RECIPE` runs the same
code on every rank. Prepared data is made once before the launch (`make train` runs `finetune prepare` first);
ranks only check that it is current. A run resumes from its newest complete checkpoint (`train.resume: auto`),
with optimizer, scheduler, data order and RNG state, so a killed run ends where an uninterrupted one would; a
finished run trained again trains nothing.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import (EarlyStoppingCallback, PreTrainedTokenizerBase, ProgressCallback, Trainer, TrainingArguments,
                          set_seed)
from transformers.trainer_utils import IntervalStrategy

from finetune.callbacks import FollowNewSchedule, MetricsFile, RunFinished, StopWhenFinished, Throughput, TokenProgress
from finetune.chat_template import save_tokenizer
from finetune.checkpoints import clear_checkpoints, plan_resume, run_identity
from finetune.collate import FeedbackCollator, PackedCollator, PairCollator
from finetune.distributed import (is_main_process, main_print, process_group, same_on_every_rank, same_prepared_data,
                                  use_cpu)
from finetune.errors import UserError, writing
from finetune.modeling import (apply_lora, base_config, context_length, load_base_model, parameter_counts,
                               without_kv_cache)
from finetune.plots import plot_loss
from finetune.prepare import ensure_prepared
from finetune.prepared import load_prepared, load_prepared_tokenizer, read_manifest
from finetune.recipe import DEFAULT_DDP_TIMEOUT_S, STAGE_ARGUMENTS, TRAINING_ARGUMENTS, Recipe, save_recipe
from finetune.run_folder import RECIPE_FILE
from finetune.tracking import environment as tracking_environment
from finetune.tracking import guard as guard_trackers
from finetune.objectives import needs_reference
from finetune.feedback_trainer import FeedbackTrainer
from finetune.preference_trainer import PreferenceTrainer, disable_dropout, frozen_copy
from finetune.reference_logps import WithReference, cached_reference_logps
from finetune.rl.config import RL_OBJECTIVES
from finetune.rl.rewards import load_rewards
from finetune.rl.trainer import RLTrainer
from finetune.trainer import PackedTrainer



def train(recipe: Recipe) -> Trainer:
    """Run the stage; returns the Trainer, whose model is the final one (the best checkpoint when evaluating).
    Two runs of one recipe at once would share checkpoints/ and metrics.jsonl: the main process holds a lock."""
    timeout = recipe.train.extra.get("ddp_timeout", DEFAULT_DDP_TIMEOUT_S)
    with process_group(timeout) as state, tracking_environment(recipe), \
            recipe.run.locked("train") if is_main_process() else nullcontext():
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
    # Decided before the collective below: past it, the main process may be replacing checkpoints/ as others read.
    plan = plan_resume(recipe, identity)
    resume = plan.checkpoint
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
    if plan.start_over:
        clear_checkpoints(trainer, recipe.run, identity, plan.had_checkpoints)
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
    """Fail before prepare on a base that is not a model, or a block size (with reward RL: and a completion) the
    model cannot take."""
    limit = context_length(base_config(recipe))
    if recipe.data.block_size > limit:
        raise UserError(f"{recipe.source}: 'data.block_size' = {recipe.data.block_size} is above the model's "
                        f"context length (n_positions = {limit}); use at most {limit}")
    if recipe.train.objective in RL_OBJECTIVES and recipe.data.block_size + recipe.rl.max_completion_tokens > limit:
        raise UserError(f"{recipe.source}: a prompt of up to 'data.block_size' ({recipe.data.block_size}) tokens and "
                        f"'rl.max_completion_tokens' ({recipe.rl.max_completion_tokens}) exceed the model's context "
                        f"length (n_positions = {limit}): lower one of them")


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
        if contiguous:
            return f"[{ids[0]}-{ids[-1]}]"
        return f"[{','.join(map(str, ids))}]" if len(ids) > 1 else str(ids[0])

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
    evaluate = validation and recipe.train.eval_steps != 0 and recipe.train.objective not in RL_OBJECTIVES
    return training_arguments(recipe, evaluate)


def build_trainer(recipe: Recipe, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                  args: TrainingArguments | None = None) -> Trainer:
    cfg = recipe.train
    args = args or run_arguments(recipe)
    evaluate = args.eval_strategy != IntervalStrategy.NO
    throughput = Throughput()
    make_trainer = objective_trainer(recipe, model, tokenizer)
    splits = {"train": load_prepared(recipe, "train"), **({"validation": load_prepared(recipe, "validation")}
                                                          if evaluate else {})}
    if cfg.objective != "sft" and cfg.preference.precompute_reference:
        cached = cached_reference_logps(recipe.run, read_manifest(recipe)["fingerprint"], model, splits,
                                        make_trainer.keywords["data_collator"], args.per_device_eval_batch_size,
                                        cfg.loss_chunk)
        splits = {split: WithReference(store, cached[split]) for split, store in splits.items()}
    trainer = make_trainer(
        loss_chunk=cfg.loss_chunk,
        model=model, args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("validation"),
        callbacks=[StopWhenFinished(), FollowNewSchedule(), throughput, MetricsFile(recipe.run.metrics)],
    )  # no processing_class: Trainer would copy pad = EOS into the model config (final/ gets the tokenizer)
    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokenProgress(throughput))
    if cfg.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    guard_trackers(trainer)
    return trainer


def objective_trainer(recipe: Recipe, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> partial:
    """The Trainer class of `train.objective` with its objective-specific arguments bound: PackedTrainer for sft;
    FeedbackTrainer for kto; RLTrainer for grpo and rloo; PreferenceTrainer otherwise (reward included); dropout off,
    with a frozen copy of `model` (the base, before any training) as the reference when fine-tuning in full, unless
    its log-probabilities are computed once (train.preference.precompute_reference)."""
    cfg = recipe.train
    pad_token_id = tokenizer.pad_token_id
    if cfg.objective == "sft":
        return partial(PackedTrainer, data_collator=PackedCollator(pad_token_id))
    disable_dropout(model)
    if cfg.objective in RL_OBJECTIVES:
        rewards = load_rewards(recipe.rl.rewards, recipe.rl.reward_text == "full", PartialState().device)
        return partial(RLTrainer, objective=cfg.objective, rl=recipe.rl, rewards=rewards, tokenizer=tokenizer,
                       reference_model=frozen_copy(model) if recipe.lora is None else None)
    in_memory = needs_reference(cfg.objective) and not cfg.preference.precompute_reference
    reference = frozen_copy(model) if recipe.lora is None and in_memory else None
    if cfg.objective == "kto":
        return partial(FeedbackTrainer, data_collator=FeedbackCollator(pad_token_id, recipe.data.block_size),
                       objective=cfg.objective, preference=cfg.preference, reference_model=reference)
    return partial(PreferenceTrainer, data_collator=PairCollator(pad_token_id), objective=cfg.objective,
                   preference=cfg.preference, reference_model=reference)


def save_final(recipe: Recipe, trainer: Trainer, tokenizer: PreTrainedTokenizerBase) -> Path:
    """`final/`: the adapter (PEFT format) or the full model (safetensors), the tokenizer and the resolved recipe;
    its config has `use_cache` back on so generation uses a KV cache, and a reward model's no pad id (plain
    transformers then scores a sequence at its last token, where it was trained: finetune/reward.py)."""
    run = recipe.run
    final, staging = run.final, run.final.with_name("final.tmp")
    main = is_main_process()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    config = trainer.model.config
    config.use_cache = True
    pad = config.pad_token_id
    if recipe.train.objective == "reward":
        config.pad_token_id = None
    trainer.save_model(str(staging))
    config.pad_token_id = pad
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
