"""`finetune merge` (a LoRA adapter folded into its base: a plain transformers model) and `finetune push` (an
upload folder with the model, tokenizer, recipe, eval results and a model card, loaded back and checked against
the run's model before it is sent to the Hugging Face Hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.chat_template import save_tokenizer
from finetune.errors import UserError
from finetune.modeling import is_adapter, load_final, quiet_peft, trained_recipe
from finetune.recipe import HubSource, Recipe
from finetune.run_folder import RECIPE_FILE
from finetune.tokenizer import load_tokenizer

MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "*.safetensors",
               "model.safetensors.index.json")
METRICS = ("loss", "perplexity", "bits_per_byte", "accuracy")
PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"
EXAMPLES = {"text": "Once upon a time", "instruction": "Explain what a language model is in one sentence.",
            "chat": "Hello! What can you do?", "classification": "A wonderful, moving film."}


def merge(recipe: Recipe) -> Path:
    """Write `<run>/merged/`: the adapter merged into its base, in safetensors, with the tokenizer and recipe."""
    final = recipe.run.final
    if final.is_dir() and not is_adapter(final):
        raise UserError(f"{final} is already a full model (the run had no LoRA adapter): nothing to merge; "
                        "load final/ directly")
    model = load_final(final).merge_and_unload()
    model.config.use_cache = True
    out = recipe.run.merged
    staging = out.with_name("merged.tmp")  # renamed into place when complete: `push --merged` trusts merged/
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    save_tokenizer(load_tokenizer(str(final)), trained_recipe(recipe, final).data, staging)
    write_shareable_recipe(final, staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"merged model written to {out}")
    return out


def write_shareable_recipe(final: Path, folder: Path, hub_base: str | None = None) -> None:
    """final/'s recipe in `folder`, without this machine's paths (a merged model or an upload is for others);
    `hub_base` names the Hub model the base folder is a copy of."""
    if not (final / RECIPE_FILE).is_file():
        return
    shared = without_local_paths(yaml.safe_load((final / RECIPE_FILE).read_text()))
    if hub_base and shared["model"].get("base"):
        shared["model"]["base"] = hub_base
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(shared, sort_keys=False, allow_unicode=True))


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


def usage_snippet(repo: str, adapter: bool, recipe: Recipe) -> str:
    """Python that loads the pushed model from the Hub and generates: prompted formats through the tokenizer's chat
    template (the recipe's prompt format, see finetune/chat_template.py), plain text as is."""
    cfg = recipe.generate
    sampling = (f"do_sample=True, temperature={cfg.temperature}, top_p={cfg.top_p}" if cfg.temperature > 0
                else "do_sample=False")
    loader = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    imports = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer"] if adapter \
        else ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    example = EXAMPLES[recipe.data.format]
    encode = [f"inputs = tokenizer({example!r}, return_tensors=\"pt\")"] if recipe.data.format == "text" else [
        f"messages = [{{\"role\": \"user\", \"content\": {example!r}}}]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
        "                                       return_tensors=\"pt\")"]
    return "\n".join([
        *imports, "",
        f"model = {loader}.from_pretrained({repo!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({repo!r})",
        *encode,
        f"output = model.generate(**inputs, max_new_tokens={cfg.max_new_tokens}, {sampling},",
        "                        pad_token_id=tokenizer.eos_token_id)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]) + "\n"


def _data_sources(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(Hub data set ids, descriptions of every source) of the recipe's data."""
    hub, described = [], []
    for source in (recipe.data.train, recipe.data.validation):
        if isinstance(source, HubSource):
            hub.append(source.hub)
            described.append(f"[{source.hub}](https://huggingface.co/datasets/{source.hub})"
                             + (f" ({source.config})" if source.config else ""))
        elif source:
            described.append(f"a local file `{Path(source).name}`")
    return list(dict.fromkeys(hub)), described


def model_card(recipe: Recipe, repo: str, adapter: bool, hub_base: str | None, evaluation: dict | None
               ) -> ModelCard:
    hub_data, described = _data_sources(recipe)
    metrics = [m for m in METRICS if evaluation and isinstance(evaluation.get(m), (int, float))]
    tags = ["gpt2-finetune", "text-generation", recipe.data.format] + (["lora", "peft"] if adapter else [])
    data = ModelCardData(base_model=hub_base, library_name="peft" if adapter else "transformers",
                         pipeline_tag="text-generation", tags=tags, datasets=hub_data or None,
                         metrics=metrics or None)
    base = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else (
        "a GPT-2 trained from scratch" if recipe.model.init is not None else "a local base model")
    kind = (f"A LoRA adapter (r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {recipe.lora.targets}) for "
            if adapter else ("A merged LoRA fine-tune of " if recipe.lora else "A full fine-tune of "))
    lines = [f"# {repo.split('/')[-1]}", "",
             f"{kind}{base}, trained with gpt2-finetune (recipe `{recipe.name}`) on {' and '.join(described)} "
             f"in the `{recipe.data.format}` format.", ""]
    if metrics:
        baseline = evaluation.get("baseline") or {}
        lines += ["## Evaluation", "", "| metric | fine-tuned | base |", "|---|---|---|"]
        lines += [f"| {m} | {evaluation[m]:.4g} | {baseline[m]:.4g} |" if isinstance(baseline.get(m), (int, float))
                  else f"| {m} | {evaluation[m]:.4g} | |" for m in metrics]
        lines.append("")
    length = (f"{recipe.train.max_steps} steps" if recipe.train.max_steps > 0 else f"{recipe.train.epochs} epochs")
    lines += ["## Usage", "", "```python", usage_snippet(repo, adapter, recipe).rstrip(), "```", "",
              "Prompts follow the template the model was trained with (the tokenizer's `chat_template`; see `recipe.yaml`, "
              "section `data`).", "",
              "## Training", "",
              f"- block size {recipe.data.block_size}, learning rate {recipe.train.lr}, {length}, "
              f"seed {recipe.train.seed}",
              "- the full resolved recipe is `recipe.yaml`; evaluation figures are in `eval.json`", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=torch.tensor([ids]), use_cache=False).logits.float()


def check_loads(folder: Path, final: Path, adapter: bool, base: str | None) -> None:
    """Load the upload folder the way a user would (peft / transformers) and compare with the run's model."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if adapter:
            from peft import PeftModel

            with quiet_peft():
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - whatever stops a user from loading it stops the push
        raise UserError(f"the upload folder {folder} does not load back: {type(exc).__name__}: {exc}") from None
    reference_tokenizer = load_tokenizer(str(final))
    ids = reference_tokenizer(PROBE)["input_ids"]
    if tokenizer(PROBE)["input_ids"] != ids:
        raise UserError(f"the tokenizer in {folder} encodes differently from the one in {final}")
    gap = (_logits(model, ids) - _logits(load_final(final), ids)).abs().max().item()
    if gap > 1e-3:
        raise UserError(f"the model in {folder} does not reproduce {final} (logits differ by up to {gap:.3g})")


def without_local_paths(value: Any) -> Any:
    """A copy fit to publish: absolute paths of this machine (data files, run and base folders) reduced to their
    last component, and `output_dir` dropped; dictionary keys (eval.files names) alike."""
    if isinstance(value, dict):
        return {without_local_paths(k): without_local_paths(v) for k, v in value.items() if k != "output_dir"}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def assemble(recipe: Recipe, repo: str, merged: bool, base_model: str | None) -> tuple[Path, bool]:
    """Write `<run>/hub/` (what would be uploaded) and check that it loads back; returns (folder, is_adapter)."""
    final = recipe.run.final
    if not final.is_dir():
        raise UserError(f"{final} does not exist: train the recipe first (finetune train RECIPE)")
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
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _copy_model(source, folder, hub_base if adapter else None)
    tokenizer = load_tokenizer(str(final))
    save_tokenizer(tokenizer, trained_recipe(recipe, final).data, folder)
    write_shareable_recipe(final, folder, hub_base)
    evaluation = None
    if recipe.run.eval_results.is_file():
        evaluation = json.loads(recipe.run.eval_results.read_text())
        (folder / "eval.json").write_text(json.dumps(without_local_paths(evaluation), indent=2))
    else:
        print(f"note: no {recipe.run.eval_results} (run finetune eval first): the model card has no figures")
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
