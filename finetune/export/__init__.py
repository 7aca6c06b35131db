"""`finetune export`: the trained model in the formats GPT-2 is deployed with, each checked by its own runtime
before it is reported: GGUF for llama.cpp, Ollama and LM Studio (gguf.py), ONNX for onnxruntime and
transformers.js (onnx.py)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from finetune.errors import UserError
from finetune.modeling import is_adapter, is_reward_model, load_final, trained_recipe
from finetune.recipe import Recipe
from finetune.tokenizer import load_tokenizer


def trained_model(recipe: Recipe) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, Recipe]:
    """The run's `final/` as one plain GPT-2 language model in float32 (a LoRA adapter merged into its base in
    memory), its tokenizer, and the recipe it was trained with (its prompt template)."""
    final = recipe.run.final
    model = load_final(final)
    if is_reward_model(model):
        raise UserError(f"{final} is a reward model (a scorer, not a text generator): export takes language models")
    if is_adapter(final):
        model = model.merge_and_unload()
    model.config.use_cache = True
    return model.eval(), load_tokenizer(str(final)), trained_recipe(recipe, final)
