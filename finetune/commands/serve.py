"""`finetune serve RECIPE`: an HTTP API for the tuned model, with OpenAI-compatible endpoints."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.recipe import Recipe, check_bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (serve.host, default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (serve.port, default 8000)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $FINETUNE_API_KEY, "
                                          "or the variable named by serve.api_key_env)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--base", action="store_true", help="serve the bare base model(s) instead of final/")
    which.add_argument("--with-base", action="store_true",
                       help="serve each run's bare base model (NAME-base) too, e.g. to compare them in the playground")


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    check_bound("serve.port", args.port, "--port")
    from finetune.serve import serve

    serve(recipe, host=args.host, port=args.port, api_key=args.api_key, base=args.base,
          with_base=args.with_base)


COMMAND = Command("serve", "HTTP API, including OpenAI-compatible endpoints", run, add_arguments)
