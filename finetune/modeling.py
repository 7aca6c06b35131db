"""Models: load or initialise GPT-2, attach GPT-2-aware LoRA, load a run's final model and the recipe it was
trained with."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, PretrainedConfig, PreTrainedTokenizerFast)
from transformers.pytorch_utils import Conv1D

from finetune.errors import UserError, path_problem
from finetune.recipe import LoraConfig, Recipe, recipe_from_dict
from finetune.run_folder import RECIPE_FILE

LORA_PRESETS = {
    "attn": ["attn.c_attn"],
    "attn_all": ["attn.c_attn", "attn.c_proj"],
    "mlp": ["mlp.c_fc", "mlp.c_proj"],
    "all": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@contextmanager
def loading_model(path: str | Path, name: str = "model.base") -> Iterator[None]:
    """Loading the model at `path` (called `name` in messages): a folder that holds no model, or a model
    transformers or the Hub cannot give, is a user error naming it."""
    local = Path(path)
    if local.is_file():
        raise UserError(f"{name} {str(path)!r} is a file, not a model folder")
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        raise UserError(f"{name} {str(path)!r} is a LoRA adapter, not a whole model: merge it into its base first "
                        "(finetune merge on the recipe that trained it) and use that run's merged/ folder")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"{name} {str(path)!r} is a folder but not a model (no config.json in it)")
    try:
        yield
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load {name} {str(path)!r}: {type(exc).__name__}: {exc}") from None


def base_config(recipe: Recipe) -> PretrainedConfig:
    """The base model's config without its weights (model.init's GPT-2 config for a model trained from scratch)."""
    cfg = recipe.model
    if cfg.base is None:
        return GPT2Config(**cfg.init)  # its keys and values were checked when the recipe loaded
    with loading_model(cfg.base):
        return AutoConfig.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)


def load_base_model(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """The recipe's base model: `model.base` through AutoModelForCausalLM, or a fresh GPT-2 from `model.init`; for
    `train.objective: reward` the same backbone under a scalar head (num_labels=1) initialised from the seed, so
    the eval baseline's untrained head is the one training started from."""
    cfg = recipe.model
    reward = recipe.train.objective == "reward"
    if cfg.dtype == "float16" and not torch.cuda.is_available():
        warnings.warn(f"{recipe.source}: 'model.dtype' float16 on a machine without CUDA: CPU float16 kernels are slow "
                      "and training in float16 without loss scaling can diverge; use float32 or bfloat16 here",
                      stacklevel=2)
    head = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id} if reward else {}
    if reward or cfg.init is not None:
        torch.manual_seed(recipe.train.seed)
    if cfg.init is not None:
        config = GPT2Config(**{**cfg.init, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                               "eos_token_id": tokenizer.eos_token_id, **head})  # model.init was checked at load
        config._attn_implementation = cfg.attn_implementation
        model = (GPT2ForSequenceClassification if reward else GPT2LMHeadModel)(config)
        if cfg.dtype not in ("float32", "auto"):
            model = model.to(DTYPES[cfg.dtype])
        return _causal_lm(model)
    with loading_model(cfg.base):
        model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
            cfg.base, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **head,
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return _causal_lm(model)


def is_reward_model(model: torch.nn.Module) -> bool:
    """A model with a sequence-classification head (`score`, as GPT2ForSequenceClassification's)."""
    return hasattr(model, "score")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 derives the loss from the class name and finds none in "GPT2LMHeadModel" (it warns, then
    uses the causal-LM loss): name it. (A reward model's loss is finetune/reward.py's.)"""
    if not is_reward_model(model):
        model.loss_type = "ForCausalLM"
    return model


def context_length(model: torch.nn.Module | PretrainedConfig) -> int:
    config = getattr(model, "config", model)
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def lora_targets(model: torch.nn.Module, targets: str | list[str]) -> tuple[list[str], bool]:
    """Resolve a preset or module list to the matched module names, and whether they are GPT-2 Conv1D."""
    patterns = LORA_PRESETS.get(targets, [targets]) if isinstance(targets, str) else list(targets)
    leaves = {name: module for name, module in model.named_modules() if isinstance(module, (Conv1D, torch.nn.Linear))}
    matched = [name for name in leaves if any(name == p or name.endswith("." + p) for p in patterns)]
    missing = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in leaves)]
    if missing:
        kinds = sorted({".".join(n.split(".")[-2:]) for n in leaves})
        presets = ", ".join(LORA_PRESETS)
        raise UserError(f"lora.targets: {', '.join(map(repr, missing))} matches no module; "
                        f"presets: {presets}; modules: {', '.join(kinds)}")
    conv1d = {isinstance(leaves[n], Conv1D) for n in matched}
    if len(conv1d) > 1:
        raise UserError("lora.targets mixes Conv1D and Linear modules; target one kind per run")
    return matched, conv1d == {True}


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads a property that transformers 5 deprecated; its FutureWarning tells users nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> tuple[torch.nn.Module, list[str]]:
    """Wrap `model` with a LoRA adapter (returned with the matched module names); Conv1D gets fan_in_fan_out."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    matched, conv1d = lora_targets(model, cfg.targets)
    patterns = LORA_PRESETS.get(cfg.targets, [cfg.targets]) if isinstance(cfg.targets, str) else list(cfg.targets)
    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=patterns, bias=cfg.bias,
        fan_in_fan_out=conv1d, modules_to_save=cfg.modules_to_save,
        task_type="SEQ_CLS" if is_reward_model(model) else "CAUSAL_LM",  # SEQ_CLS trains the head in full
    )
    with quiet_peft():
        return get_peft_model(model, peft_config), matched


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_final(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A run's `final/` (or `merged/`): a PEFT adapter over its recorded base, or a full model; a reward model
    (GPT2ForSequenceClassification) as one, its pad id set so it scores batches of packed rows."""
    folder = Path(folder)
    if problem := path_problem(folder, folder=True):
        hint = (": train the recipe first (finetune train RECIPE)" if problem == "not found"
                else " (a model folder is needed)")
        raise UserError(f"{folder}: {problem}{hint}")
    if is_adapter(folder):
        from peft import PeftModel

        adapter = json.loads((folder / "adapter_config.json").read_text())
        base_path = adapter["base_model_name_or_path"]
        reward = adapter.get("task_type") == "SEQ_CLS"
        with loading_model(base_path, "the adapter's base model"):
            base = (AutoModelForSequenceClassification.from_pretrained(base_path, dtype=dtype, num_labels=1)
                    if reward else AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype))
        with quiet_peft():
            model = PeftModel.from_pretrained(base, folder)
    else:
        with loading_model(folder, "the model folder"):
            config = AutoConfig.from_pretrained(folder)
            reward = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
            model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
                folder, dtype=dtype)
    if reward:
        model.config.pad_token_id = model.config.eos_token_id  # final/ saves none: see finetune/reward.py
    return model


def trained_recipe(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe the model in `folder` was trained with (its recipe.yaml: the prompt template that applies even
    if the recipe file changed since), else `recipe`."""
    saved = folder / RECIPE_FILE
    if not saved.is_file():
        return recipe
    try:
        return recipe_from_dict(yaml.safe_load(saved.read_text()), folder, str(saved))
    except UserError as exc:
        print(f"note: using {recipe.source}, not {saved}: {exc}", file=sys.stderr)
        return recipe


def without_kv_cache(model: torch.nn.Module) -> torch.nn.Module:
    """No KV cache in training or scoring: transformers then derives the packed (block-diagonal) mask from
    position ids. A cache would silently fall back to one causal mask over the whole packed row."""
    model.config.use_cache = False
    return model
