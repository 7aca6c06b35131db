"""`finetune merge RECIPE`: merge the trained LoRA adapter into its base model (the run's merged/)."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.recipe import Recipe


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    from finetune.merge import merge

    merge(recipe)


COMMAND = Command("merge", "merge a LoRA adapter into its base model", run)
