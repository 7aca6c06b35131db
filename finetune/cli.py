"""Command line: `finetune COMMAND RECIPE [key.path=value ...] [options]`.

Exit status 0 on success, 2 on a user error (one line naming the file and key or row), 1 on anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from finetune.errors import UserError

COMMANDS = {
    "prepare": ("finetune.prepare_command", "tokenize and pack the data (cached)"),
    "train": ("finetune.train", "train the model (LoRA or full), resuming from the newest checkpoint"),
    "eval": ("finetune.evaluation", "perplexity, bits per byte and task accuracy, base against tuned"),
    "generate": ("finetune.generation", "sample text from the tuned (or base) model"),
    "chat": ("finetune.chat", "interactive chat with the tuned model"),
    "serve": ("finetune.serve", "HTTP API, including OpenAI-compatible endpoints"),
    "merge": ("finetune.hub", "merge a LoRA adapter into its base model"),
    "push": ("finetune.hub", "push the adapter or merged model with a model card to the Hub"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """The parser; only the selected command's module is imported (stage modules import torch)."""
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune GPT-2 family language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("recipe", help="recipe YAML file")
        command.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
        if name == selected:
            importlib.import_module(module_name).add_arguments(command, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected if selected in COMMANDS else None).parse_args(argv)
    from finetune.recipe import load_recipe

    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        return int(module.run(args.command, recipe, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
