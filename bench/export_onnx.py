"""ONNX export benchmark: export time, file size, the export's own agreement figures, and greedy generation speed
in onnxruntime (through the exported KV cache) against transformers (generate, its own cache), same model, prompt
and thread count, in the same run: each side in a process of its own, the sides taking turns, the best of --repeats
runs each (a machine shared with other work slows both alike).

    python -m bench.export_onnx [--new-tokens 64] [--threads 2] [--repeats 3]

The model is GPT-2 small's shape (12 x 768, 1024 positions, 124M parameters) with random weights (seed 0) and the
real GPT-2 tokenizer, written as a finished full fine-tuning run and exported with `export_onnx` as
`finetune export --to onnx` does.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from bench.common import record, shared_or_skip, side_in_subprocess  # noqa: E402
from finetune.export.onnx import CHECK_TEXT, GRAPH, OnnxLM, export_onnx  # noqa: E402
from finetune.recipe import load_recipe, save_recipe  # noqa: E402
from finetune.tokenizer import load_tokenizer  # noqa: E402


def finished_run(folder: Path) -> Path:
    """A full fine-tuning run of a random GPT-2 small with the real tokenizer, as train leaves it; its recipe file."""
    tokenizer = load_tokenizer(str(shared_or_skip("gpt2-tokenizer")))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    (folder / "train.txt").write_text(CHECK_TEXT + "\n")
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "bench-onnx", "output_dir": str(folder / "run"),
                                    "model": {"base": str(folder / "run" / "final")},
                                    "data": {"train": str(folder / "train.txt")}, "lora": None}))
    recipe = load_recipe(path)
    model.save_pretrained(recipe.run.final)
    tokenizer.save_pretrained(recipe.run.final)
    save_recipe(recipe, recipe.run.final / "recipe.yaml")
    return path


def greedy_side(side: str, folder: Path, final: Path, new_tokens: int, threads: int) -> dict:
    """One side's greedy generation (after a short warm-up run) with the export in `folder` or the model in `final`:
    its tokens/s and tokens."""
    torch.set_num_threads(threads)
    prompt = load_tokenizer(str(folder))(CHECK_TEXT)["input_ids"][:32]
    if side == "onnxruntime":
        lm = OnnxLM(folder / GRAPH, GPT2Config.from_pretrained(folder), threads=threads)

        def generate(n: int) -> list[int]:
            return lm.greedy(prompt, n)
    else:
        model = GPT2LMHeadModel.from_pretrained(final).eval()

        def generate(n: int) -> list[int]:
            with torch.inference_mode():
                ids = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return ids[0, len(prompt):].tolist()
    generate(4)  # first-call allocations and kernel choices
    started = time.perf_counter()
    tokens = generate(new_tokens)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": len(tokens) / seconds, "tokens": tokens, "prompt_tokens": len(prompt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["onnxruntime", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--final", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(greedy_side(args.side, Path(args.folder), Path(args.final), args.new_tokens, args.threads)))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(finished_run(Path(tmp)))
        started = time.perf_counter()
        out = export_onnx(recipe)
        export_seconds = time.perf_counter() - started
        rates, runs = {"onnxruntime": 0.0, "transformers": 0.0}, {}
        for _ in range(args.repeats):  # the sides take turns, each in a process of its own
            for side in rates:
                runs[side] = side_in_subprocess("bench.export_onnx", side, [
                    "--folder", str(out), "--final", str(recipe.run.final), "--new-tokens", str(args.new_tokens),
                    "--threads", str(args.threads)])
                rates[side] = max(rates[side], runs[side]["tokens_per_s"])
        size = sum(path.stat().st_size for path in (out / GRAPH.parent).iterdir())
        tokens = [runs[side]["tokens"] for side in rates]
        record("export_onnx", {
            "model": "gpt2-small shape (124M, random, seed 0), real tokenizer", "threads": args.threads,
            "export_seconds": round(export_seconds, 1), "onnx_mb": round(size / 1e6, 1),
            "prompt_tokens": runs["onnxruntime"]["prompt_tokens"], "new_tokens": args.new_tokens,
            "onnxruntime_tokens_per_s": round(rates["onnxruntime"], 1),
            "transformers_tokens_per_s": round(rates["transformers"], 1),
            "onnxruntime_vs_transformers": round(rates["onnxruntime"] / rates["transformers"], 2),
            "greedy_tokens_identical": f"{sum(a == b for a, b in zip(*tokens))}/{args.new_tokens}",
        })


if __name__ == "__main__":
    main()
