"""Run folders for the generate / chat / serve / merge / push tests, built without the train stage.

A tiny GPT-2 is really trained (plain torch loop, a few seconds) to recite the word list of helpers.WORDS from
any word to its end, then EOS; a LoRA adapter is trained on top of it. conftest.py builds them once a session.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from helpers import RECITAL, WORDS, write_recipe_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from finetune.modeling import apply_lora
from finetune.tokenizer import load_tokenizer
from finetune.recipe import Recipe, load_recipe, save_recipe



def _batches(tokenizer, steps: int, batch_size: int, seed: int):
    eos = tokenizer.eos_token_id
    rows = [tokenizer(" ".join(WORDS[i:]))["input_ids"] + [eos] for i in range(len(WORDS))]
    rng = random.Random(seed)
    for _ in range(steps):
        picked = [rng.choice(rows) for _ in range(batch_size)]
        width = max(map(len, picked))
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in picked])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in picked])
        yield ids, labels


def _train(model: torch.nn.Module, tokenizer, steps: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(0.0)
    for ids, labels in _batches(tokenizer, steps, 16, seed):
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def train_recital_base(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 (2 layers, 32 wide, 128 positions) trained to recite the word list, saved with its tokenizer
    in `folder`."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    loss = _train(model, tokenizer, steps=150, lr=1e-2, seed=0)
    assert loss < 0.3, f"the tiny model did not learn the word list (loss {loss:.3f})"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(folder: Path, name: str, base: Path, fmt: str = "text", lora: bool = True, **extra) -> Path:
    """A recipe file for a run whose output folder is `folder/name`."""
    (folder / "train.txt").write_text(RECITAL + "\n")
    raw = {"name": name, "model": {"base": str(base)},
           "data": {"train": str(folder / "train.txt"), "format": fmt, "block_size": 64},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all"} if lora else None,
           "generate": {"max_new_tokens": 40, "temperature": 0.8}, **extra}
    return write_recipe_file(folder / f"{name}.yaml", raw)


def _save_final(recipe: Recipe, model: torch.nn.Module, tokenizer) -> None:
    final = recipe.run.final
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    save_recipe(recipe, final / "recipe.yaml")


def write_finished_runs(folder: Path, base: Path) -> dict[str, Path]:
    """Recipe files of three finished runs in `folder`: `lora` (an adapter trained over `base`; serves `full` too
    as an extra run), `full` (the base itself as a full fine-tune) and `chat` (a full model with the chat format)."""
    tokenizer = load_tokenizer(str(base))
    paths = {
        "full": write_recipe(folder, "tiny-full", base, lora=False),
        "chat": write_recipe(folder, "tiny-chat", base, fmt="chat", lora=False,
                             **{"generate": {"max_new_tokens": 24, "temperature": 0.0}}),
    }
    paths["lora"] = write_recipe(folder, "tiny-lora", base, serve={"extra_runs": ["tiny-full.yaml"]})
    for key in ("full", "chat"):
        _save_final(load_recipe(paths[key]), AutoModelForCausalLM.from_pretrained(base), tokenizer)
    recipe = load_recipe(paths["lora"])
    model, _ = apply_lora(AutoModelForCausalLM.from_pretrained(base), recipe.lora)
    _train(model, tokenizer, steps=20, lr=3e-3, seed=1)
    _save_final(recipe, model, tokenizer)
    return paths
