"""Experiment tracking: TensorBoard events written by a real training run hold exactly the losses of
metrics.jsonl; trackers are checked at recipe load and never passed through `train.extra`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import corpus_lines, write_recipe_file
from finetune.errors import UserError
from finetune.recipe import load_recipe
from finetune.train import train, training_arguments


def write_recipe(tmp_path: Path, base: Path, **train_keys) -> Path:
    (tmp_path / "train.txt").write_text("\n".join(corpus_lines(300, seed=1)) + "\n")
    return write_recipe_file(tmp_path / "recipe.yaml", {
           "name": "tracked", "output_dir": str(tmp_path / "run"), "model": {"base": str(base)}, "lora": None,
           "data": {"train": str(tmp_path / "train.txt"), "block_size": 32, "validation_fraction": 0.1},
           "train": {"max_steps": 6, "batch_size": 8, "logging_steps": 1, "save_steps": 3, "eval_steps": 3,
                     "lr": 3e-3, "seed": 0, **train_keys}})


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir))
    assert recipe.train.report_to == "tensorboard"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(recipe)
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in recipe.run.metrics.read_text().splitlines()]
    events = EventAccumulator(str(recipe.run.tensorboard))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        expected = {row["step"]: float(np.float32(row[key])) for row in rows if key in row}
        assert logged == expected, tag  # TensorBoard stores float32: the same number, rounded once
    speeds = {e.step: e.value for e in events.Scalars("train/tokens_per_s")}  # metrics.jsonl rounds it to 0.1
    assert speeds.keys() == {row["step"] for row in rows if "loss" in row}
    assert all(abs(speeds[row["step"]] - row["tokens_per_s"]) <= 0.06 for row in rows if "loss" in row)
    assert sorted({e.step for e in events.Scalars("eval/loss")}) == [3, 6]
    assert len(events.Scalars("train/loss")) == 6


@pytest.mark.parametrize("override, message", [
    ("train.report_to=tensorbord", r"'train.report_to' must be one of none, tensorboard, wandb, mlflow, trackio, "
                                   r"got 'tensorbord'; did you mean 'tensorboard'\?"),
    ("train.report_to=[]", r"'train.report_to' is an empty list"),
    ("train.report_to=[none, tensorboard]", r"'train.report_to' lists none together with trackers"),
    ("train.report_to=[1]", r"'train.report_to' entries must be strings, got 1"),
])
def test_bad_report_to_is_rejected_at_load(tmp_path, tiny_model_dir, override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(write_recipe(tmp_path, tiny_model_dir), [override])


def test_a_tracker_that_is_not_installed_names_the_key_and_the_install(tmp_path, tiny_model_dir):
    import importlib.util

    missing = next((name for name in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("wandb, mlflow and trackio are all installed here")
    with pytest.raises(UserError, match=rf"'train.report_to' = {missing} needs the {missing} package, which is not "
                                        rf"installed: pip install {missing}"):
        load_recipe(write_recipe(tmp_path, tiny_model_dir), [f"train.report_to=[tensorboard, {missing}]"])


def test_trackers_and_run_name_reach_trainer_and_not_through_extra(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, tiny_model_dir)
    args = training_arguments(load_recipe(path, ["train.report_to=none"]), evaluate=True)
    assert args.report_to == [] and args.run_name == "tracked"
    args = training_arguments(load_recipe(path, ["train.run_name=lr-3e-3"]), evaluate=True)
    assert args.report_to == ["tensorboard"] and args.run_name == "lr-3e-3"
    for key, owner in (("report_to", "train.report_to"), ("run_name", "train.run_name")):
        with pytest.raises(UserError, match=rf"'train.extra.{key}' cannot be passed through: set '{owner}' instead"):
            training_arguments(load_recipe(path, [f"train.extra.{key}=wandb"]), evaluate=True)


def test_a_failing_tracker_is_switched_off_and_the_run_finishes(tmp_path, tiny_model_dir, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(blocker / "events"))  # cannot be created
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir), ["train.max_steps=2", "train.eval_steps=0"])
    train(recipe)
    assert "TensorBoardCallback failed in on_train_begin and is off for the rest of the run" in capsys.readouterr().err
    assert (recipe.run.final / "model.safetensors").is_file()


def test_trackers_default_to_offline_stores_in_the_run_folder(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from finetune.recipe import recipe_from_dict
    from finetune.tracking import environment

    raw = yaml.safe_load(write_recipe(tmp_path, tiny_model_dir).read_text())
    raw["train"]["report_to"] = ["wandb", "mlflow", "trackio"]
    recipe = recipe_from_dict(raw)  # validated; whether the packages are installed is not checked here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    run = (tmp_path / "run").resolve()
    with environment(recipe):
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(run)
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{run / 'mlflow.db'}"
        assert os.environ["TRACKIO_DIR"] == str(run / "trackio")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9" and "WANDB_MODE" not in os.environ
    err = capsys.readouterr().err
    assert "W&B: no login, logging offline" in err and "MLflow: http://127.0.0.1:9 is unreachable" in err
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's settings win
    with environment(recipe):
        assert os.environ["WANDB_MODE"] == "disabled"


def test_mlflow_logs_the_losses_to_the_local_store_when_installed(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow)")
    import sqlite3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, report_to="mlflow"))
    train(recipe)
    with sqlite3.connect(recipe.run.root / "mlflow.db") as db:
        logged = db.execute("SELECT key, step, value FROM metrics WHERE key IN ('loss', 'eval_loss')").fetchall()
    rows = [json.loads(line) for line in recipe.run.metrics.read_text().splitlines()]
    assert sorted(logged) == sorted((key, row["step"], row[key]) for row in rows for key in ("loss", "eval_loss")
                                    if key in row)
