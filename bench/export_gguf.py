"""GGUF export benchmark: export time (with its llama.cpp check) and file size per tensor type, and greedy
generation speed in llama.cpp (xllamacpp, CPU) against transformers on the same model, prompt and thread count.

The model is GPT-2 small's shape (12 layers, 768 wide, 1024 positions) with random weights over the real GPT-2
tokenizer, written as a finished run. Tokens/s = new tokens / wall seconds of one greedy generation of --tokens
tokens (end-of-text ignored) after the same prompt, in one process, one after the other; transformers is timed
before and after the llama.cpp runs (a shared machine's load changes) and the ratios use the mean.

    .venv/bin/python -m bench.export_gguf [--tokens 128] [--threads 1] [--types f32,f16,q8_0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from bench.common import record, shared_or_skip  # noqa: E402
from finetune.export.gguf import export_gguf  # noqa: E402
from finetune.export.llama_cpp import LlamaCpp  # noqa: E402
from finetune.recipe import load_recipe, save_recipe  # noqa: E402
from finetune.tokenizer import load_tokenizer  # noqa: E402

PROMPT = "The tuned model runs where people deploy GPT-2: llama.cpp, Ollama and LM Studio read GGUF files, and"


def small_run(folder: Path, tokenizer) -> Path:
    """A finished run whose final/ is a random GPT-2 small; returns its recipe file."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    (folder / "train.txt").write_text(PROMPT + "\n")
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "bench-gguf", "output_dir": str(folder / "run"),
                                    "model": {"base": str(folder / "run" / "final")},
                                    "data": {"train": str(folder / "train.txt")}, "lora": None}))
    final = folder / "run" / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    save_recipe(load_recipe(path), final / "recipe.yaml")
    return path


def transformers_tokens_per_second(model: torch.nn.Module, ids: list[int], tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == len(ids) + tokens
    return tokens / seconds


def llama_tokens_per_second(path: Path, ids: list[int], tokens: int, threads: int) -> float:
    with LlamaCpp(path, 1024, threads) as llama:
        llama.generate(ids, 4)  # the first call sets up llama.cpp's compute graph
        start = time.perf_counter()
        reply = llama.generate(ids, tokens)
        seconds = time.perf_counter() - start
    assert reply["usage"]["completion_tokens"] == tokens, reply["usage"]
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    # one thread each by default: on a machine shared with other work, two torch threads wait on each other
    # (transformers measured 2.3-4.3 tokens/s at 2 threads against 12-13 at 1 here)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--types", default="f32,f16,q8_0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(shared_or_skip("gpt2-tokenizer")))
    ids = tokenizer(PROMPT)["input_ids"]
    figures: dict = {"model": "GPT-2 small shape (124M), random weights, real tokenizer", "threads": args.threads,
                     "prompt_tokens": len(ids), "new_tokens": args.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(small_run(Path(tmp), tokenizer))
        model = GPT2LMHeadModel.from_pretrained(recipe.run.final).eval()
        transformers_tokens_per_second(model, ids, 4)  # warm-up
        before = transformers_tokens_per_second(model, ids, args.tokens)
        speeds = {}
        for name in args.types.split(","):
            start = time.perf_counter()
            folder = export_gguf(recipe, [name])
            figures[f"{name}_export_s_with_check"] = round(time.perf_counter() - start, 1)
            path = folder / f"model-{name}.gguf"
            figures[f"{name}_file_mb"] = round(path.stat().st_size / 2**20, 1)
            speeds[name] = llama_tokens_per_second(path, ids, args.tokens, args.threads)
        after = transformers_tokens_per_second(model, ids, args.tokens)
        reference = (before + after) / 2
        figures["transformers_float32_tokens_per_s_before_after"] = [round(before, 1), round(after, 1)]
        for name, speed in speeds.items():
            figures[f"{name}_llama_cpp_tokens_per_s"] = round(speed, 1)
            figures[f"{name}_llama_cpp_vs_transformers"] = round(speed / reference, 2)
    record("export_gguf", figures)


if __name__ == "__main__":
    main()
