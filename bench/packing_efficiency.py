"""Packing efficiency: best-fit-decreasing bin packing against one example per row padded to block_size.

    python -m bench.packing_efficiency
"""

from __future__ import annotations

import tempfile

from bench.common import record, shared_or_skip
from finetune.prepare import prepare
from finetune.recipe import recipe_from_dict

CASES = {
    "alpaca": {"train": "alpaca/alpaca_en_demo.json", "format": "instruction", "block_size": 1024},
    "sst2": {"train": "sst2/train.tsv", "format": "classification", "block_size": 128,
             "classification": {"text_field": "sentence", "labels": {0: "negative", 1: "positive"}}},
}


def efficiency(data: dict, tokenizer: str, packing: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_dict({"name": "bench", "output_dir": tmp, "model": {"base": "gpt2"},
                                   "tokenizer": {"path": tokenizer}, "data": {**data, "packing": packing}})
        return prepare(recipe, force=True)["train"]


def main() -> None:
    tokenizer = str(shared_or_skip("gpt2-tokenizer"))
    for name, data in CASES.items():
        data = {**data, "train": str(shared_or_skip(data["train"]))}
        packed, padded = efficiency(data, tokenizer, True), efficiency(data, tokenizer, False)
        print(f"{name} (block {data['block_size']}):")
        record("packing_efficiency", {
            "case": name, "block_size": data["block_size"], "packed_efficiency": packed["packing_efficiency"],
            "padded_efficiency": padded["packing_efficiency"], "packed_rows": packed["sequences"],
            "padded_rows": padded["sequences"],
            "ratio_packed_vs_padded": round(packed["packing_efficiency"] / padded["packing_efficiency"], 2)})


if __name__ == "__main__":
    main()
