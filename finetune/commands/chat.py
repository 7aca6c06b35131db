"""`finetune chat RECIPE`: an interactive dialogue with the tuned model in the recipe's chat format."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.commands.sampling import add_sampling_arguments, sampling_params
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system prompt (default: data.chat.system_prompt)")
    add_sampling_arguments(parser)


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    params = sampling_params(recipe, args)
    from finetune.chat import chat

    chat(recipe, params, system=args.system, base=args.base)


COMMAND = Command("chat", "interactive chat with the tuned model", run, add_arguments)
