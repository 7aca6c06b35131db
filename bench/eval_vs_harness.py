"""Eval throughput against EleutherAI lm-evaluation-harness: the same model, text and batch size.

    python -m bench.eval_vs_harness [--batch 16]

Model: a GPT-2 of 2 layers x 128 (n_positions 256) with the real GPT-2 tokenizer, trained for 60 steps on
WikiText-2 by `finetune train` so that its figures are not those of a uniform guess. Text: the WikiText-2
validation file as one document. Ours: `finetune eval --model` with `eval.files` (block 256, windows without
overlap); the harness: `lm_eval --model hf` on a local `loglikelihood_rolling` task over the same text. Both are
timed as whole processes (imports, model loading, tokenizing, scoring); ours also scores a one-line validation
split. Bits per byte are printed side by side; goal: ratio >= 1.0 and agreement within 0.1 %.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import ROOT, record, shared_or_skip

TASK = """task: bench_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def timed(command: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if importlib.util.find_spec("lm_eval") is None:
        print("skip: lm-eval is not installed (pip install lm-eval==0.4.13)")
        return
    text = shared_or_skip("wikitext-2/wikitext2_validation.txt")
    tokenizer = shared_or_skip("gpt2-tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "one.txt").write_text("a single line of validation text\n")
        recipe = {"name": "bench-harness", "output_dir": str(tmp / "run"),
                  "model": {"init": {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 256}},
                  "tokenizer": {"path": str(tokenizer)}, "lora": None,
                  "data": {"train": str(text), "validation": str(tmp / "one.txt"), "block_size": 256},
                  "train": {"max_steps": 60, "lr": 3e-3, "batch_size": 8, "save_steps": 60, "eval_steps": 0},
                  "eval": {"files": [str(text)], "batch_size": args.batch, "baseline": False}}
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        timed([sys.executable, "-m", "finetune", "train", str(tmp / "recipe.yaml")])
        final = tmp / "run" / "final"
        ours_seconds = timed([sys.executable, "-m", "finetune", "eval", str(tmp / "recipe.yaml"),
                              "--model", str(final)])
        ours = json.loads((tmp / "run" / "eval.json").read_text())["files"][str(text)]
        (tmp / "doc.jsonl").write_text(json.dumps({"text": text.read_text(encoding="utf-8")}) + "\n")
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "bench_wikitext.yaml").write_text(TASK.format(data=tmp / "doc.jsonl"))
        harness_seconds = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                                 f"pretrained={final},dtype=float32", "--tasks", "bench_wikitext", "--include_path",
                                 str(tmp / "tasks"), "--batch_size", str(args.batch), "--device", "cpu",
                                 "--output_path", str(tmp / "harness")])
        results = next((tmp / "harness").rglob("results_*.json"))
        harness_bpb = json.loads(results.read_text())["results"]["bench_wikitext"]["bits_per_byte,none"]
    tokens = ours["input_tokens"]
    print(f"eval vs lm-evaluation-harness (2 x 128 GPT-2, vocab 50,257, WikiText-2 validation, batch {args.batch}):")
    record("eval_vs_harness", {
        "tokens": tokens, "batch": args.batch, "ours_seconds": round(ours_seconds, 1),
        "harness_seconds": round(harness_seconds, 1), "ours_tokens_per_s": round(tokens / ours_seconds),
        "harness_tokens_per_s": round(tokens / harness_seconds),
        "ratio_ours_vs_harness": round(harness_seconds / ours_seconds, 2),
        "ours_bits_per_byte": round(ours["bits_per_byte"], 5), "harness_bits_per_byte": round(harness_bpb, 5),
        "bits_per_byte_difference_pct": round(abs(ours["bits_per_byte"] / harness_bpb - 1) * 100, 3)})


if __name__ == "__main__":
    main()
