"""Preference pairs for the tests of the preference objectives (test_preference.py, test_reward.py,
test_feedback.py): separable synthetic pairs (and the same rated one completion at a time), a recipe file training
on them, and pairs tokenized as prepare does."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from helpers import WORDS, subprocess_env, write_recipe_file

from finetune.formats import data_format, encode_segments
from finetune.recipe import DataConfig

GOOD, BAD = WORDS[:12], WORDS[12:24]


def separable_pairs(n: int, seed: int) -> list[dict]:
    """Prompts of random words; the chosen response of words from GOOD, the rejected one as many words from BAD."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(2, 5)
        rows.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))),
                     "chosen": " ".join(rng.choice(GOOD) for _ in range(length)),
                     "rejected": " ".join(rng.choice(BAD) for _ in range(length))})
    return rows


def separable_feedback(n: int, seed: int) -> list[dict]:
    """The separable pairs unpaired: each pair's chosen response a desirable completion of its prompt, its rejected
    one an undesirable completion (KTO's data, `data.format: feedback`)."""
    return [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in separable_pairs(n, seed) for side in ("chosen", "rejected")]


def write_run(tmp_path: Path, model_dir: Path, rows: list[dict], lora: dict | None = None, name: str = "pref",
              data_kind: str = "preference", **train) -> Path:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = {"name": name, "model": {"base": str(model_dir)},
           "data": {"train": str(data), "format": data_kind, "block_size": 64, "validation_fraction": 0.2},
           "lora": lora,
           "train": {"objective": "dpo", "max_steps": 40, "lr": 3e-3, "batch_size": 8, "logging_steps": 5,
                     "save_steps": 20, "scheduler": "constant", "seed": 0, "report_to": "none", **train}}
    return write_recipe_file(tmp_path / f"{name}.yaml", raw)


def pair_rows(tokenizer, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The pairs tokenized as prepare does (prompt, then each response's targets), as (TRL examples, our packed
    row holding all of them)."""
    fmt = data_format(DataConfig(format="preference"))
    examples, row = [], {"input_ids": [], "labels": [], "position_ids": []}
    for raw in rows:
        prompt, chosen, rejected = (encode_segments(tokenizer, [segs])[0] for segs in
                                    fmt.pair_segments(fmt.normalize(raw, "row")[0]))
        examples.append({"prompt_ids": prompt[0], "chosen_ids": chosen[0], "rejected_ids": rejected[0]})
        for response, _ in (chosen, rejected):
            ids = prompt[0] + response
            row["input_ids"] += ids
            row["labels"] += [-100] * len(prompt[0]) + response
            row["position_ids"] += list(range(len(ids)))
    return examples, [row]


def train_and_evaluate(recipe: Path, run: Path) -> tuple[dict, list[dict]]:
    """`finetune train` then `finetune eval` of `recipe` as subprocesses; the run's eval.json and metrics.jsonl."""
    for stage in ("train", "eval"):
        subprocess.run([sys.executable, "-m", "finetune", stage, str(recipe)], env=subprocess_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "eval.json").read_text()), metrics
