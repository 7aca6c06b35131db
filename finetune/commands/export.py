"""`finetune export RECIPE --to gguf|onnx`: the trained model for llama.cpp / Ollama / LM Studio (GGUF) or
onnxruntime / transformers.js (ONNX), into the run's gguf/ or onnx/, checked against that runtime."""

from __future__ import annotations

import argparse

from finetune.commands import Command
from finetune.recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=("gguf", "onnx"), help="the format to write")
    parser.add_argument("--types", default="f16", help="GGUF only: tensor types, comma-separated (f32, f16, q8_0)")


def run(recipe: Recipe, args: argparse.Namespace) -> None:
    if args.to == "gguf":
        from finetune.export.gguf import export_gguf

        export_gguf(recipe, [name.strip() for name in args.types.split(",") if name.strip()])
    else:
        from finetune.export.onnx import export_onnx

        export_onnx(recipe)


COMMAND = Command("export", "export the trained model as GGUF (llama.cpp, Ollama) or ONNX (onnxruntime)", run,
                  add_arguments)
