"""Command line: `finetune COMMAND RECIPE [key.path=value ...] [options]`.

Exit status 0 on success, 2 on a user error (one line naming the file and key or row), 1 on anything else.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import platform
import sys

from finetune.errors import UserError

MALLOC_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STORAGE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)  # one line, exit 1
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


def keep_freed_memory() -> None:
    """glibc returns every large block (over 128 KB to 32 MB, adaptively) to the kernel when it is freed, so each
    training step maps, faults in and unmaps its activations and logits again: at GPT-2's vocabulary most of a
    CPU step was system time. Serving blocks up to 1 GB from the heap and keeping up to 1 GB of freed memory
    lets every step reuse the previous one's pages (measured: 1.6x faster, see README Performance)."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(MALLOC_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(MALLOC_TRIM_THRESHOLD, 1 << 30)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides += extra  # key=value overrides may also follow the options
    from finetune.recipe import load_recipe

    if args.command in ("train", "eval"):
        keep_freed_memory()

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
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        print(f"error: {exc.filename or 'the output folder'}: {exc.strerror} (nothing half-written is trusted by "
              "a rerun: prepare and train check what they resume from)", file=sys.stderr)
        return 1
