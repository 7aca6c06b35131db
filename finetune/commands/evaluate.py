"""`finetune eval RECIPE [--model FOLDER]`: perplexity, bits per byte and task accuracy, base against tuned."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.allocator import keep_freed_memory
from finetune.commands import Command
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="FOLDER", help="model folder to evaluate (default: the run's final/)")


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    keep_freed_memory()
    from finetune.evaluation import evaluate

    evaluate(recipe, Path(args.model) if args.model else None)


COMMAND = Command("eval", "perplexity, bits per byte and task accuracy, base against tuned", run, add_arguments)
