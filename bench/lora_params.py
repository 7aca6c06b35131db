"""Trainable parameters of each LoRA preset on the gpt2 (124M) and gpt2-medium (355M) shapes.

    python -m bench.lora_params [--r 8]

The models are built from GPT2Config on the meta device (no download, no memory), then wrapped by the
same `modeling.apply_lora` the train stage uses.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.common import record
from finetune.modeling import LORA_PRESETS, apply_lora, parameter_counts
from finetune.recipe import LoraConfig

SHAPES = {"gpt2": GPT2Config(), "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=LoraConfig.r)
    args = parser.parse_args()
    for name, config in SHAPES.items():
        with torch.device("meta"):
            _, total = parameter_counts(GPT2LMHeadModel(config))
            figures = {"model": name, "r": args.r, "total_parameters": total}
            for preset in LORA_PRESETS:
                model, matched = apply_lora(GPT2LMHeadModel(config), LoraConfig(r=args.r, targets=preset))
                trainable, _ = parameter_counts(model)
                figures[preset] = {"modules": len(matched), "trainable": trainable,
                                   "share_percent": round(100 * trainable / total, 3)}
        print(f"{name}:")
        record("lora_params", figures)


if __name__ == "__main__":
    main()
