"""`finetune generate RECIPE --prompt TEXT | --prompt-file FILE`: sample text from the tuned (or base) model."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.commands import Command
from finetune.commands.sampling import add_sampling_arguments, sampling_params
from finetune.data import read_utf8
from finetune.errors import UserError
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument("--prompt-file", help="a file with one prompt a line")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (seeds seed, seed+1, ...)")
    parser.add_argument("--raw", action="store_true", help="use the prompt as is, without the recipe's template")
    add_sampling_arguments(parser)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise UserError(f"--prompt-file {path}: no such file")
    prompts = [line for line in read_utf8(path).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path}: no prompts in it (one prompt a line)")
    return prompts


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    prompts = read_prompts(args)
    params = sampling_params(recipe, args)
    from finetune.generate import generate

    generate(recipe, prompts, params, num_samples=args.num_samples, raw=args.raw, base=args.base)


COMMAND = Command("generate", "sample text from the tuned (or base) model", run, add_arguments)
