"""Prepare throughput (tokens/s) against raw batched tokenizer encoding of the same text, real GPT-2 tokenizer.

    python bench/prepare_throughput.py
"""

from __future__ import annotations

import tempfile
import time

from transformers import GPT2TokenizerFast

from bench.common import record, shared_or_skip
from finetune.data import RowRef, parse_row, read_batches
from finetune.formats import data_format
from finetune.prepare import prepare
from finetune.recipe import recipe_from_dict

CASES = {
    "sst2": {"train": "sst2/train.tsv", "format": "classification", "block_size": 128,
             "classification": {"text_field": "sentence", "labels": {0: "negative", 1: "positive"}}},
    "tinyshakespeare": {"train": "tinyshakespeare/input.txt", "format": "text", "block_size": 256},
}


def raw_tokens_per_second(tokenizer, texts: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), 1000):
        tokens += sum(len(ids) for ids in tokenizer(texts[start:start + 1000])["input_ids"])
    return tokens / (time.perf_counter() - started), tokens


def source_texts(cfg) -> list[str]:
    """The texts prepare tokenizes: every kept record's segments."""
    fmt = data_format(cfg)
    texts = []
    for batch in read_batches(cfg.train, cfg):
        for i, raw in enumerate(batch.rows):
            where = RowRef(cfg.train, batch.start + i)
            record, _ = fmt.normalize(parse_row(raw, where), where)
            texts += [text for text, _ in fmt.segments(record) if text] if record else []
    return texts


def main() -> None:
    tokenizer_dir = shared_or_skip("gpt2-tokenizer")
    tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    for name, data in CASES.items():
        data = {**data, "train": str(shared_or_skip(data["train"]))}
        with tempfile.TemporaryDirectory() as tmp:
            recipe = recipe_from_dict({"name": name, "output_dir": tmp, "model": {"base": "gpt2"},
                                       "tokenizer": {"path": str(tokenizer_dir)}, "data": data})
            texts = source_texts(recipe.data)
            raw, raw_tokens = raw_tokens_per_second(tokenizer, texts)
            started = time.perf_counter()
            manifest = prepare(recipe, force=True)
            seconds = time.perf_counter() - started
        tokens = manifest["train"]["tokens"] + manifest["validation"]["tokens"]
        print(f"{name}:")
        record("prepare_throughput", {
            "case": name, "tokens": tokens, "prepare_seconds": round(seconds, 2),
            "prepare_tokens_per_s": round(tokens / seconds), "raw_tokenizer_tokens_per_s": round(raw),
            "ratio_prepare_vs_raw": round(tokens / seconds / raw, 3)})


if __name__ == "__main__":
    main()
