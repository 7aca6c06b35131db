"""Reference log-probabilities computed once and cached with the run (`train.preference.precompute_reference`,
finetune/reference_logps.py): equal to freshly computed ones, the same training as with a frozen reference copy,
and never trusted for another base, other data, or a file a killed run tore."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import save_tiny_gpt2, subprocess_env
from preference_pairs import separable_pairs, write_run
from finetune.errors import UserError
from finetune.modeling import without_kv_cache
from finetune.prepare import prepare
from finetune.prepared import load_prepared_tokenizer
from finetune.preference_trainer import pair_logps
from finetune.recipe import load_recipe
from finetune.tokenizer import load_tokenizer
from finetune.train import build_model, build_trainer, train

CACHED = {"preference": {"precompute_reference": True}}
# Measured: cached values (computed in rows of eval-size batches, chunk 1024) and fresh ones (the first shuffled batch,
# chunk 5) agree bitwise here, at 1 and 2 threads; a float32 sum of a sequence's log-probs (down to -85 here) is up
# to 4.0e-6 from a float64 forward (tests/test_preference.py), what another CPU's summation order may move. 10x that:
LOGP_ABSOLUTE = 4e-5
# Measured: the two 12-step runs' losses, validation losses and margins agree to 0.0 here. A reference moved by
# LOGP_ABSOLUTE moves a DPO loss by at most sigmoid(-h) * beta * 2 * LOGP_ABSOLUTE = 4e-6 a step (h = 0, beta 0.1):
LOSS_ABSOLUTE = 1e-5


def cached_trainer(recipe_file: Path, *overrides: str):
    recipe = load_recipe(recipe_file, list(overrides))
    prepare(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    return recipe, build_trainer(recipe, build_model(recipe, tokenizer), tokenizer)


def stored(recipe) -> dict[str, np.ndarray]:
    with np.load(recipe.run.reference_logps) as saved:
        return {key: saved[key] for key in saved.files}


def fresh(model_dir: Path, batch: dict):
    from transformers import AutoModelForCausalLM

    base = without_kv_cache(AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    with torch.no_grad():
        return pair_logps(base, batch, chunk=5)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_cached_reference_log_probs_equal_freshly_computed_ones(tmp_path: Path, tiny_model_dir: Path,
                                                                lora: dict | None) -> None:
    recipe, trainer = cached_trainer(write_run(tmp_path, tiny_model_dir, separable_pairs(40, seed=7), lora, **CACHED),
                                     "data.block_size=128")  # rows of several pairs
    assert trainer.reference_model is None  # no frozen copy in memory
    with torch.no_grad():  # the policy moves away from the base: the reference must not follow it
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    pairs = 0
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        batch = trainer._prepare_inputs(next(iter(loader)))
        cached, expected = trainer.reference_logps(batch), fresh(tiny_model_dir, batch)
        pairs += len(cached.chosen) - len(batch["input_ids"])
        assert (cached.chosen - expected.chosen).abs().max() <= LOGP_ABSOLUTE
        assert (cached.rejected - expected.rejected).abs().max() <= LOGP_ABSOLUTE
        assert torch.equal(cached.chosen_tokens, expected.chosen_tokens)
        assert (pair_logps(trainer.model, batch, 5).chosen - expected.chosen).abs().max() > 1e-2
    assert pairs > 0  # rows of several pairs, in shuffled batches: each value is found by its sequence's place
    assert set(stored(recipe)) == {"key", "train", "validation"}


@pytest.mark.slow
def test_a_run_with_the_cache_trains_as_one_with_the_frozen_copy(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = separable_pairs(80, seed=8)
    runs = {}
    for name, preference in (("frozen", {}), ("cached", {"precompute_reference": True})):
        train(load_recipe(write_run(tmp_path, tiny_model_dir, rows, name=name, max_steps=12, logging_steps=1,
                                    save_steps=6, preference=preference)))
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "eval_loss", "rewards/margins"):
        frozen, cached = ([m[key] for m in runs[name] if key in m] for name in ("frozen", "cached"))
        assert len(frozen) == len(cached) > 1
        assert max(abs(a - b) for a, b in zip(frozen, cached)) <= LOSS_ABSOLUTE, key
    assert cached[-1] > cached[0]  # it trained: the margins grew



def test_a_changed_base_or_changed_data_recomputes(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = separable_pairs(40, seed=9)
    recipe_file = write_run(tmp_path, tiny_model_dir, rows, **CACHED)
    recipe, _ = cached_trainer(recipe_file)
    first = stored(recipe)
    written = recipe.run.reference_logps.stat().st_mtime_ns
    cached_trainer(recipe_file)  # the same base and data: read back, not written again
    assert recipe.run.reference_logps.stat().st_mtime_ns == written

    other_base = save_tiny_gpt2(load_tokenizer(str(tiny_model_dir)), tmp_path / "other", n_layer=2, n_head=2,
                                n_embd=32, n_positions=128, initializer_range=0.05)
    cached_trainer(recipe_file, f"model.base={other_base}")
    second = stored(recipe)
    assert second["key"] != first["key"] and np.abs(second["train"] - first["train"]).max() > 1e-2

    data = tmp_path / "pref.jsonl"
    data.write_text(data.read_text() + "".join(json.dumps(row) + "\n" for row in separable_pairs(4, seed=10)))
    cached_trainer(recipe_file, f"model.base={other_base}")
    third = stored(recipe)
    assert third["key"] != second["key"] and len(third["train"]) + len(third["validation"]) == 2 * 44

    recipe.run.reference_logps.write_bytes(recipe.run.reference_logps.read_bytes()[:100])  # as a torn write
    cached_trainer(recipe_file, f"model.base={other_base}")
    assert all(np.array_equal(value, stored(recipe)[key]) for key, value in third.items())


def test_precompute_reference_needs_an_objective_with_a_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe_file = write_run(tmp_path, tiny_model_dir, separable_pairs(4, seed=11), objective="simpo", **CACHED)
    with pytest.raises(UserError, match="precompute_reference.*simpo"):
        load_recipe(recipe_file)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in m}


def finetune_train(recipe: Path, *overrides: str, processes: int = 1) -> subprocess.Popen:
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                str(processes), "--main_process_port", str(free_port())] if processes > 1 else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "finetune", "train", str(recipe), *overrides], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_cache_serves_several_processes_and_a_resume_after_sigkill(tmp_path: Path, tiny_model_dir: Path,
                                                                         one_thread) -> None:
    recipe = write_run(tmp_path, tiny_model_dir, separable_pairs(80, seed=12), max_steps=8, logging_steps=1,
                       save_steps=4, **CACHED)
    runs = {name: tmp_path / name for name in ("whole", "killed", "two")}
    for run in runs.values():  # before any launch, as `make train` does
        prepare(load_recipe(recipe, [f"output_dir={run}"]))
    train(load_recipe(recipe, [f"output_dir={runs['whole']}"]))  # one thread, as the subprocesses
    killed = finetune_train(recipe, f"output_dir={runs['killed']}")
    while not (runs["killed"] / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists():
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    written = (runs["killed"] / "reference" / "logps.npz").stat().st_mtime_ns
    assert finetune_train(recipe, f"output_dir={runs['killed']}").wait() == 0
    assert (runs["killed"] / "reference" / "logps.npz").stat().st_mtime_ns == written  # read back, not recomputed
    assert losses(runs["killed"]) == losses(runs["whole"])  # measured: equal to 0.0, as resume is exact
    launched = finetune_train(recipe, f"output_dir={runs['two']}", "train.batch_size=4", "train.max_steps=4",
                              processes=2)
    assert launched.wait(timeout=600) == 0
    # policy == reference at the first step: each rank's pairs found their own cached values, or the mean of the
    # ranks' losses would not be float32's log 2 (as the one-process run's first loss is)
    two, whole = losses(runs["two"]), losses(runs["whole"])
    assert two[1] == pytest.approx(math.log(2), abs=1e-6) and whole[1] == pytest.approx(math.log(2), abs=1e-6)
    assert len(two) == 4 and losses(runs["two"], "eval_loss")  # validation read its cached values too
