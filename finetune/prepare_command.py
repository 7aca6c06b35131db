"""`finetune prepare RECIPE`: tokenize and pack the recipe's data into the run folder."""

from __future__ import annotations

import argparse

from finetune.prepare import prepare
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--force", action="store_true", help="prepare again even if the cache is current")


def run(command: str, recipe: Recipe, args: argparse.Namespace) -> int:
    prepare(recipe, force=args.force)
    return 0
