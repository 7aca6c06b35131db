"""`eval.harness`: lm-evaluation-harness run in-process by `finetune eval`, beside our figures. On the same model
and data, the harness's classification accuracy equals ours and its bits per byte agree with ours."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from helpers import corpus_lines, write_recipe_file
from finetune.cli import main

pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[harness]")')

CLASSIFY = """task: tiny_labels
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nLabel:"
doc_to_choice: ["bad", "good"]
doc_to_target: "{{{{['bad', 'good'].index(label)}}}}"
metric_list: [{{metric: acc}}]
"""
ROLLING = """task: tiny_text_bpb
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {data}}}}}
validation_split: validation
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: bits_per_byte}}]
"""


def write_run(tmp_path: Path, base: Path) -> Path:
    rng = random.Random(0)
    rows = [{"text": line, "label": rng.choice(["bad", "good"])} for line in corpus_lines(60, seed=3)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = "\n".join(corpus_lines(150, seed=4)) + "\n"
    (tmp_path / "text.txt").write_text(text)
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_labels.yaml").write_text(CLASSIFY.format(data=tmp_path / "labels.jsonl"))
    (tasks / "tiny_text_bpb.yaml").write_text(ROLLING.format(data=tmp_path / "text.jsonl"))
    raw = {"name": "harness", "output_dir": str(tmp_path / "run"), "model": {"base": str(base)}, "lora": None,
           "data": {"train": str(tmp_path / "labels.jsonl"), "validation": str(tmp_path / "labels.jsonl"),
                    "format": "classification", "block_size": 128,
                    "classification": {"labels": ["bad", "good"], "template": "{text}\nLabel:"}},
           "eval": {"files": [str(tmp_path / "text.txt")], "stride": 127, "baseline": False, "batch_size": 8,
                    "harness": {"tasks": ["tiny_labels", "tiny_text_bpb"], "include_path": "tasks"}}}
    return write_recipe_file(tmp_path / "recipe.yaml", raw)


def test_harness_figures_equal_ours_on_the_same_model_and_data(tmp_path, tiny_model_dir):
    """Both stacks run at 1 and 2 threads: their figures do not move (the measured noise is nil on this tiny
    model), so accuracy must be equal. Bits per byte cannot be identical: the harness scores a document's first
    token after an EOS prefix (we leave it unscored) and its windows of 128 inputs predict 128 tokens (ours, at
    stride 127, 127); the gap this makes is 7e-5 here and 6e-5 on WikiText-2 (bench.eval_vs_harness), so the
    bound is 1e-3, well under what a real scoring difference (a token too many or too few per window, padding
    scored) would produce."""
    path = write_run(tmp_path, tiny_model_dir)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert main(["eval", str(path), "--model", str(tiny_model_dir)]) == 0
            results.append(json.loads((tmp_path / "run" / "eval.json").read_text()))
    finally:
        torch.set_num_threads(before)
    figures = [(res["accuracy"], res["harness"]["tiny_labels"]["acc,none"],
                res["files"][str(tmp_path / "text.txt")]["bits_per_byte"],
                res["harness"]["tiny_text_bpb"]["bits_per_byte,none"]) for res in results]
    assert figures[0] == figures[1]  # 1 thread == 2 threads, for both stacks
    ours_accuracy, harness_accuracy, ours_bpb, harness_bpb = figures[0]
    assert ours_accuracy == harness_accuracy
    assert 0.2 < ours_accuracy < 0.8  # a random model: the comparison is not between two trivial figures
    assert ours_bpb == pytest.approx(harness_bpb, rel=1e-3)
    assert (tmp_path / "run" / "report.md").read_text().count("| tiny_labels | acc |") == 1


def test_a_task_that_cannot_load_is_a_user_error_naming_the_key(tmp_path, tiny_model_dir, capsys):
    path = write_run(tmp_path, tiny_model_dir)
    assert main(["eval", str(path), "--model", str(tiny_model_dir), "eval.harness.tasks=[no_such_task]"]) == 2
    err = capsys.readouterr().err
    assert "'eval.harness.tasks': 'no_such_task' cannot be loaded" in err and "Traceback" not in err
    (tmp_path / "tasks" / "tiny_labels.yaml").write_text(CLASSIFY.format(data=tmp_path / "missing.jsonl"))
    assert main(["eval", str(path), "--model", str(tiny_model_dir), "eval.harness.tasks=[tiny_labels]"]) == 2
    assert "'eval.harness.tasks': 'tiny_labels' cannot be loaded" in capsys.readouterr().err
    assert main(["eval", str(path), "eval.harness.include_path=nowhere"]) == 2
    assert "'eval.harness.include_path'" in capsys.readouterr().err


def test_without_lm_eval_the_harness_is_a_user_error_naming_the_install(tmp_path, tiny_model_dir, monkeypatch,
                                                                         capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # Python's own way to make a package unimportable
    assert main(["eval", str(write_run(tmp_path, tiny_model_dir)), "--model", str(tiny_model_dir)]) == 2
    assert "'eval.harness' needs lm-evaluation-harness, which is not installed: pip install -e \".[harness]\"" \
        in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval.json").exists()
