"""Loading a run's model for generation: its `final/` (with the prompt format it was trained with), or the base."""

from __future__ import annotations

import torch

from finetune.errors import UserError
from finetune.generation.generator import Generator
from finetune.modeling import DTYPES, is_reward_model, load_base_model, load_final, trained_recipe
from finetune.recipe import Recipe
from finetune.tokenizer import load_tokenizer, tokenizer_source


def load_generator(recipe: Recipe, base: bool = False) -> Generator:
    """The run's `final/` model (adapter over its base, or a full model), or with `base` the bare base model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[recipe.model.dtype] if device.type == "cuda" and recipe.model.dtype != "auto" else torch.float32
    if base:
        if recipe.model.base is None:
            raise UserError(f"{recipe.source}: the base model (--base, --with-base) needs 'model.base'; this recipe "
                            "trains from scratch ('model.init'), so its base model is random weights")
        source = tokenizer_source(recipe)
        if source is None:
            from finetune.prepared import load_prepared_tokenizer

            tokenizer = load_prepared_tokenizer(recipe)
        else:
            tokenizer = load_tokenizer(source)
        model, data, name = load_base_model(recipe, tokenizer), recipe.data, f"{recipe.name}-base"
    else:
        final = recipe.run.final
        model, data, name = load_final(final, dtype), trained_recipe(recipe, final).data, recipe.name
        tokenizer = load_tokenizer(str(final))
        if is_reward_model(model):
            raise UserError(f"{final} is a reward model (train.objective: reward): it scores text and does not "
                            "generate; load it with AutoModelForSequenceClassification (README: Preference tuning)")
    return Generator(model.to(device), tokenizer, data, name)
