"""The model card of a pushed model: what it is, its evaluation figures, and a usage snippet that runs."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from finetune.formats import data_format
from finetune.recipe import Recipe
from finetune.sources import HubSource, split_sources

METRICS = ("loss", "perplexity", "bits_per_byte", "accuracy", "pair_accuracy", "pair_margin", "reward_accuracy",
           "kl_to_reference")
OBJECTIVES = {"dpo": "DPO (Rafailov et al. 2023, sigmoid loss)", "ipo": "IPO (Azar et al. 2023)",
              "simpo": "SimPO (Meng et al. 2024, reference-free)"}
KNOBS = {"dpo": ("beta", "label_smoothing"), "ipo": ("beta",), "simpo": ("beta", "simpo_gamma"),
         "reward": ("center_rewards_coefficient",)}  # the train.preference keys each objective reads


def usage_snippet(repo: str, adapter: bool, recipe: Recipe) -> str:
    """Python that loads the pushed model from the Hub and generates (a reward model: scores a reply): prompted
    formats through the tokenizer's chat template (the recipe's prompt format, see finetune/chat_template.py), plain
    text as is."""
    if recipe.train.objective == "reward":
        return reward_snippet(repo, adapter, data_format(recipe.data).card_example)
    cfg = recipe.generate
    sampling = (f"do_sample=True, temperature={cfg.temperature}, top_p={cfg.top_p}" if cfg.temperature > 0
                else "do_sample=False")
    loader = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
    imports = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer"] if adapter \
        else ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    fmt = data_format(recipe.data)
    example = fmt.card_example
    encode = [f"inputs = tokenizer({example!r}, return_tensors=\"pt\")"] if fmt.chat_template() is None else [
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


def reward_snippet(repo: str, adapter: bool, example: str) -> str:
    """Python that loads a pushed reward model and scores one reply: the conversation rendered by the chat template
    up to the EOS that closes the reply (where the reward was read in training), one sequence at a time."""
    loader, source, options = (("AutoPeftModelForSequenceClassification", "peft", ", num_labels=1") if adapter
                               else ("AutoModelForSequenceClassification", "transformers", ""))
    imports = [f"from peft import {loader}", "from transformers import AutoTokenizer"] if adapter else \
        [f"from {source} import {loader}, AutoTokenizer"]
    return "\n".join([
        *imports, "",
        f"model = {loader}.from_pretrained({repo!r}{options})",
        f"tokenizer = AutoTokenizer.from_pretrained({repo!r})",
        f"messages = [{{\"role\": \"user\", \"content\": {example!r}}},",
        "            {\"role\": \"assistant\", \"content\": \"A reply to score.\"}]",
        "text = tokenizer.apply_chat_template(messages, tokenize=False)",
        "text = text[:text.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]  # the reply ends with EOS",
        "reward = model(**tokenizer(text, return_tensors=\"pt\")).logits[0, 0].item()",
        "print(reward)",
    ]) + "\n"


def training_lines(recipe: Recipe) -> list[str]:
    """How the model was trained: the objective with its knobs (train.preference), the data format, the reference."""
    train, fmt = recipe.train, recipe.data.format
    knobs = ", ".join(f"{key} {getattr(train.preference, key)}" for key in KNOBS.get(train.objective, ()))
    if train.objective == "sft":
        return [f"- objective: supervised fine-tuning, next-token loss on the targets of the `{fmt}` format"]
    if train.objective == "reward":
        return [f"- objective: a reward model: GPT-2 with a scalar head (`GPT2ForSequenceClassification`, one "
                "label) on the final hidden state of a sequence's last token, trained with the Bradley-Terry loss "
                f"-log sigmoid(r_chosen - r_rejected) on pairs of chosen and rejected responses (`{fmt}` format); "
                f"train.preference: {knobs}",
                "- it scores text and does not generate: load it with `AutoModelForSequenceClassification` (see "
                "Usage); a higher score is a more preferred reply"]
    reference = ("none (reference-free)" if train.objective == "simpo" else
                 "the base model with the adapter switched off" if recipe.lora else "a frozen copy of the base model")
    return [f"- objective: {OBJECTIVES[train.objective]} on pairs of chosen and rejected responses (`{fmt}` format); "
            f"train.preference: {knobs}", f"- reference model: {reference}"]


def _data_sources(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(Hub data set ids, descriptions of every source) of the recipe's data."""
    hub, described = [], []
    for source in split_sources(recipe.data.train) + split_sources(recipe.data.validation):
        if isinstance(source, HubSource):
            hub.append(source.hub)
            described.append(f"[{source.hub}](https://huggingface.co/datasets/{source.hub})"
                             + (f" ({source.config})" if source.config else ""))
        else:
            described.append(f"local data `{Path(source.path).name}`")
    return list(dict.fromkeys(hub)), described


def model_card(recipe: Recipe, repo: str, adapter: bool, hub_base: str | None, evaluation: dict | None
               ) -> ModelCard:
    hub_data, described = _data_sources(recipe)
    metrics = [m for m in METRICS if evaluation and isinstance(evaluation.get(m), (int, float))]
    reward = recipe.train.objective == "reward"
    pipeline = "text-classification" if reward else "text-generation"
    objective = ["reward-model"] if reward else [] if recipe.train.objective == "sft" else [recipe.train.objective]
    tags = ["gpt2-finetune", pipeline, recipe.data.format, *objective] + (["lora", "peft"] if adapter else [])
    data = ModelCardData(base_model=hub_base, library_name="peft" if adapter else "transformers",
                         pipeline_tag=pipeline, tags=tags, datasets=hub_data or None,
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
              "Prompts follow the template the model was trained with (the tokenizer's `chat_template`; see "
              "`recipe.yaml`, "
              "section `data`).", "",
              "## Training", "", *training_lines(recipe),
              f"- block size {recipe.data.block_size}, learning rate {recipe.train.lr}, {length}, "
              f"seed {recipe.train.seed}",
              "- the full resolved recipe is `recipe.yaml`; evaluation figures are in `eval.json`", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
