"""`finetune push RECIPE --repo user/name`: upload the adapter (or merged model) with a model card to the Hub."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="Hub repository id, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--merged", action="store_true", help="push the merged full model instead of the adapter")
    parser.add_argument("--dry-run", action="store_true", help="write and check the upload folder; send nothing")
    parser.add_argument("--base-model", help="Hub id of the base model, when the run's base is a local copy of it")


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    from finetune.hub import push

    push(recipe, args.repo, private=args.private, merged=args.merged, dry_run=args.dry_run,
         base_model=args.base_model)


COMMAND = Command("push", "push the adapter or merged model with a model card to the Hub", run, add_arguments)
