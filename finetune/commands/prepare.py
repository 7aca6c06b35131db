"""`finetune prepare RECIPE`: tokenize and pack the recipe's data into the run folder."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="prepare again even if the cache is current")


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    from finetune.prepare import prepare

    prepare(recipe, force=args.force)


COMMAND = Command("prepare", "tokenize and pack the data (cached)", run, add_arguments)
