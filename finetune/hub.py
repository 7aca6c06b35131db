"""`finetune push`: an upload folder with the model, tokenizer, recipe, eval results and a model card, loaded back
and checked against the run's model before it is sent to the Hugging Face Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from finetune.chat_template import save_tokenizer
from finetune.errors import UserError
from finetune.eval_results import check_current, read_eval_results
from finetune.modeling import is_adapter, is_reward_model, load_final, quiet_peft, trained_recipe
from finetune.merge import merge
from finetune.model_card import model_card
from finetune.recipe import Recipe
from finetune.shareable import without_local_paths, write_shareable_recipe
from finetune.tokenizer import load_tokenizer

MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "*.safetensors",
               "model.safetensors.index.json")
PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"


def _recorded_base(recipe: Recipe, final: Path) -> str | None:
    """The base model the run started from: what the adapter records, else the recipe's model.base."""
    if is_adapter(final):
        return json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    return recipe.model.base


def _check_repo_id(value: str, option: str) -> None:
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise UserError(f"{option} {value!r} is not a Hub repository id (user/name): {exc}") from None


def _copy_model(source: Path, folder: Path, hub_base: str | None) -> None:
    for pattern in MODEL_FILES:
        for path in source.glob(pattern):
            shutil.copy2(path, folder / path.name)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{source} has no .safetensors weights to upload")
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file() and hub_base:
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = hub_base  # a local path means nothing to whoever downloads this
        adapter_config.write_text(json.dumps(config, indent=2) + "\n")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=torch.tensor([ids]), use_cache=False).logits.float()


def check_loads(folder: Path, final: Path, adapter: bool, base: str | None) -> None:
    """Load the upload folder the way a user would (peft / transformers; a reward model as a sequence classifier
    with one label) and compare with the run's model."""
    expected = load_final(final)
    reward = is_reward_model(expected)
    auto, options = (AutoModelForSequenceClassification, {"num_labels": 1}) if reward else (AutoModelForCausalLM, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if adapter:
            from peft import PeftModel

            with quiet_peft():
                model = PeftModel.from_pretrained(auto.from_pretrained(base, **options), folder)
        else:
            model = auto.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - whatever stops a user from loading it stops the push
        raise UserError(f"the upload folder {folder} does not load back: {type(exc).__name__}: {exc}") from None
    reference_tokenizer = load_tokenizer(str(final))
    ids = reference_tokenizer(PROBE)["input_ids"]
    if tokenizer(PROBE)["input_ids"] != ids:
        raise UserError(f"the tokenizer in {folder} encodes differently from the one in {final}")
    gap = (_logits(model, ids) - _logits(expected, ids)).abs().max().item()
    if gap > 1e-3:
        raise UserError(f"the model in {folder} does not reproduce {final} (logits differ by up to {gap:.3g})")


def assemble(recipe: Recipe, repo: str, merged: bool, base_model: str | None) -> tuple[Path, bool]:
    """Write `<run>/hub/` (what would be uploaded) and check that it loads back; returns (folder, is_adapter)."""
    final = recipe.run.final
    if not final.is_dir():
        raise UserError(f"{final} does not exist: train the recipe first (finetune train RECIPE)")
    evaluation = None
    if recipe.run.eval_results.is_file():
        evaluation = read_eval_results(recipe.run.eval_results)
        check_current(recipe.run.eval_results, evaluation, final)
    else:
        print(f"note: no {recipe.run.eval_results} (run finetune eval first): the model card has no figures")
    base = _recorded_base(recipe, final)
    adapter = is_adapter(final) and not merged
    source = final
    if merged and is_adapter(final):
        source = recipe.run.merged
        if not (source / "config.json").is_file() or source.stat().st_mtime < final.stat().st_mtime:
            merge(recipe)
    hub_base = base_model or (base if base and not Path(base).exists() else None)  # else a local folder
    if adapter and hub_base is None:
        raise UserError(f"the adapter's base model is a local folder ({base}), which people downloading the adapter "
                        "cannot load: pass --base-model USER/NAME naming the Hub model that folder is a copy of, "
                        "or push the full model with --merged")
    folder = recipe.run.hub
    recipe.run.claim(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _copy_model(source, folder, hub_base if adapter else None)
    tokenizer = load_tokenizer(str(final))
    save_tokenizer(tokenizer, trained_recipe(recipe, final).data, folder)
    write_shareable_recipe(final, folder, hub_base)
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(without_local_paths(evaluation), indent=2))
    model_card(trained_recipe(recipe, final), repo, adapter, hub_base, evaluation).save(
        folder / "README.md")
    check_loads(folder, final, adapter, base)
    return folder, adapter


def push(recipe: Recipe, repo: str, private: bool = False, merged: bool = False, dry_run: bool = False,
         base_model: str | None = None, api: Any = None) -> Path:
    """Assemble and check the upload folder, then (unless `dry_run`) upload it with `api` (an HfApi)."""
    _check_repo_id(repo, "--repo")
    if base_model:
        _check_repo_id(base_model, "--base-model")
    folder, adapter = assemble(recipe, repo, merged, base_model)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    print(f"{'would upload' if dry_run else 'uploading'} {folder} to {repo} "
          f"({'private' if private else 'public'}, {'adapter' if adapter else 'full model'}):")
    for path in files:
        print(f"  {path.name:32} {path.stat().st_size:>12,} bytes")
    if dry_run:
        return folder
    token = get_token()
    if not token:
        raise UserError("not logged in to the Hugging Face Hub: set HF_TOKEN or run `hf auth login`")
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {recipe.name} with gpt2-finetune")
    except Exception as exc:  # noqa: BLE001 - network, permission or quota problems: report, never the token
        message = str(exc).replace(token, "***")
        raise UserError(f"upload to {repo} failed: {type(exc).__name__}: {message}") from None
    print(f"pushed: https://huggingface.co/{repo}")
    return folder
