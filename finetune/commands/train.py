"""`finetune train RECIPE`: train the model (LoRA or full), resuming from the newest checkpoint of the same run."""

from __future__ import annotations

import argparse

from finetune.allocator import keep_freed_memory
from finetune.commands import Command
from finetune.recipe import Recipe


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    keep_freed_memory()
    from finetune.train import train

    train(recipe)


COMMAND = Command("train", "train the model (LoRA or full), resuming from the newest checkpoint", run)
