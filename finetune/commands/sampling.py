"""Sampling options shared by `generate` and `chat`: unset ones come from the recipe's `generate` section."""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import replace

from finetune.generation.params import SamplingParams
from finetune.recipe import Recipe, check_bound, check_stops

OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="most tokens to generate (generate.max_new_tokens)")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (generate.temperature)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (generate.top_p)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens, 0 = off (generate.top_k)")
    parser.add_argument("--repetition-penalty", type=float, help="1.0 = off (generate.repetition_penalty)")
    parser.add_argument("--seed", type=int, help="same seed, same output (generate.seed; default: random, printed)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable; adds to generate.stop)")
    parser.add_argument("--base", action="store_true", help="use the bare base model instead of the run's final/")


def sampling_params(recipe: Recipe, args: argparse.Namespace) -> SamplingParams:
    """The recipe's `generate` settings with the command-line options over them (each checked against the bound
    of its recipe key) and --stop strings added; an unset seed is drawn and printed."""
    given = {name: getattr(args, name) for name in OPTIONS}
    for name, value in given.items():
        check_bound(f"generate.{name}", value, f"--{name.replace('_', '-')}")
    check_stops(args.stop, "--stop")
    params = SamplingParams.from_config(recipe.generate).merged(given, args.stop)
    if params.seed is None:
        params = replace(params, seed=secrets.randbits(63))
        print(f"seed: {params.seed}", file=sys.stderr)
    return params
