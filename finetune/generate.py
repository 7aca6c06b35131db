"""`finetune generate RECIPE`: completions of prompts from the tuned (or base) model, streamed to stdout."""

from __future__ import annotations

import sys
from dataclasses import replace

from finetune.generation.loading import load_generator
from finetune.generation.params import SEED_RANGE, SamplingParams
from finetune.recipe import Recipe


def generate(recipe: Recipe, prompts: list[str], params: SamplingParams, num_samples: int = 1, raw: bool = False,
             base: bool = False) -> None:
    """Stream `num_samples` completions of each prompt (seeds seed, seed+1, ...) to stdout."""
    generator = load_generator(recipe, base=base)
    jobs = [(prompt, sample) for prompt in prompts for sample in range(num_samples)]
    for prompt, sample in jobs:
        seed = (params.seed + sample) % SEED_RANGE
        if len(jobs) > 1:
            print(f"=== {prompt[:60]!r} - sample {sample + 1}/{num_samples} (seed {seed}) ===")
        ids = generator.prompt_ids(prompt, raw=raw)
        fitted = generator.fit(ids, params.max_new_tokens)
        if len(fitted) < len(ids):
            print(f"note: prompt cut to its last {len(fitted)} of {len(ids)} tokens to fit the context window "
                  f"({generator.context})", file=sys.stderr)
        generator.generate(fitted, replace(params, seed=seed), on_text=lambda piece: print(piece, end="", flush=True))
        print()
