"""The commands of `finetune COMMAND RECIPE [key=value ...] [options]`, one module each: its options and the stage
call. A command imports its stage only when it runs (stages import torch), so `finetune --help` stays fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from finetune.recipe import Recipe


def no_options(parser: argparse.ArgumentParser) -> None:
    """Everything is in the recipe, overridable as key=value."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Recipe, argparse.Namespace], None]
    add_arguments: Callable[[argparse.ArgumentParser], None] = no_options
