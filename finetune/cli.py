"""Command line: `finetune COMMAND RECIPE [key.path=value ...] [options]`.

Exit status 0 on success, 2 on a user error (one line naming the file and key or row), 1 on anything else.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys

from finetune.commands import chat, evaluate, export, generate, merge, prepare, push, serve, train
from finetune.errors import UserError
from finetune.recipe import load_recipe

COMMANDS = {command.name: command for command in (prepare.COMMAND, train.COMMAND, evaluate.COMMAND, generate.COMMAND,
                                                   chat.COMMAND, serve.COMMAND, merge.COMMAND, export.COMMAND,
                                                   push.COMMAND)}
# one line naming the path, exit 1: a full, read-only or denied disk, or an output path blocked by a file
STORAGE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EEXIST, errno.ENOTDIR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune GPT-2 family language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        options = sub.add_parser(command.name, help=command.help, description=command.help)
        options.add_argument("recipe", help="recipe YAML file")
        options.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
        command.add_arguments(options)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, Slurm) stops a stage the way Ctrl-C does: cleanups run, nothing half-written is
    trusted."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides += extra  # key=value overrides may also follow the options
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        COMMANDS[args.command].run(recipe, args)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        print(f"error: {exc.filename or 'the output folder'}: {exc.strerror} (nothing half-written is trusted by "
              "a rerun: prepare and train check what they resume from)", file=sys.stderr)
        return 1
