"""`finetune merge`: the LoRA adapter folded into its base, a plain transformers model in the run's merged/."""

from __future__ import annotations

from pathlib import Path

from finetune.chat_template import save_tokenizer
from finetune.errors import UserError
from finetune.modeling import is_adapter, is_reward_model, load_final, trained_recipe
from finetune.recipe import Recipe
from finetune.shareable import write_shareable_recipe
from finetune.tokenizer import load_tokenizer


def merge(recipe: Recipe) -> Path:
    """Write `<run>/merged/`: the adapter merged into its base, in safetensors, with the tokenizer and recipe."""
    final = recipe.run.final
    if final.is_dir() and not is_adapter(final):
        raise UserError(f"{final} is already a full model (the run had no LoRA adapter): nothing to merge; "
                        "load final/ directly")
    model = load_final(final).merge_and_unload()
    model.config.use_cache = True
    if is_reward_model(model):
        model.config.pad_token_id = None  # as train saves final/: transformers pools the last token (reward.py)
    out = recipe.run.merged
    with recipe.run.staged(out) as staging:  # `push --merged` trusts a complete merged/
        model.save_pretrained(staging)
        save_tokenizer(load_tokenizer(str(final)), trained_recipe(recipe, final).data, staging)
        write_shareable_recipe(final, staging)
    print(f"merged model written to {out}")
    return out
