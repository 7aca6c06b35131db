"""The train stage on tiny GPT-2 models: it learns (full, LoRA, from scratch), `final/` loads with plain
transformers / peft, resume after SIGKILL is exact, and bad input exits 2. Launches of several processes:
test_distributed.py."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import SCRATCH, corpus_lines, subprocess_env, write_recipe
from finetune import cli
from finetune.prepare import prepare
from finetune.recipe import load_recipe
from finetune.train import train

# peft 0.21 reads a GPT-2 property that transformers 5 deprecated, when loading an adapter.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [row["loss"] for row in metrics(run) if "loss" in row]


def assert_learns(run: Path, drop: float) -> None:
    losses = train_losses(run)
    assert sum(losses[-3:]) / 3 < losses[0] - drop, losses
    evals = [row["eval_loss"] for row in metrics(run) if "eval_loss" in row]
    assert evals and evals[-1] < losses[0] - drop, evals


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 1]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_finetune_learns_and_final_loads_with_transformers(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}})
    trainer = train(load_recipe(path))
    run = tmp_path / "run"
    assert_learns(run, drop=1.0)
    assert "full fine-tuning" in capsys.readouterr().out
    rows = metrics(run)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0]) and rows[0]["tokens_per_s"] > 0
    final = run / "final"
    assert (final / "model.safetensors").is_file() and (final / "recipe.yaml").is_file()
    assert not (final / "training_args.bin").exists() and (run / "loss.png").stat().st_size > 0
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.config.use_cache is True
    torch.testing.assert_close(logits(loaded), logits(trainer.model), atol=1e-6, rtol=0)
    assert len(AutoTokenizer.from_pretrained(final)) == loaded.config.vocab_size


@pytest.fixture(scope="module")
def lora_base_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 whose embeddings are large enough (init std 0.1) for logits to move when only LoRA
    weights train: with the default 0.02 the frozen tied embeddings cap every logit near zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                        initializer_range=0.1, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("lora-base")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_learns_and_adapter_loads_with_peft(tmp_path, lora_base_dir, capsys):
    from peft import AutoPeftModelForCausalLM

    path = write_recipe(tmp_path, {"model": {"base": str(lora_base_dir)}},
                        lora={"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all"}, train={"lr": 3e-2})
    trainer = train(load_recipe(path))
    run = tmp_path / "run"
    assert_learns(run, drop=0.3)
    out = capsys.readouterr().out
    assert "transformer.h.[0-1].attn.c_attn" in out and "transformer.h.[0-1].mlp.c_proj" in out
    assert "trainable parameters of" in out
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(lora_base_dir) and adapter["fan_in_fan_out"] is True
    loaded = AutoPeftModelForCausalLM.from_pretrained(run / "final")
    torch.testing.assert_close(logits(loaded), logits(trainer.model), atol=1e-6, rtol=0)


def test_from_scratch_lora_saves_its_base_for_the_adapter(tmp_path, tokenizer_dir):
    from peft import AutoPeftModelForCausalLM

    path = write_recipe(tmp_path, {"model": {"init": SCRATCH}, "tokenizer": {"path": str(tokenizer_dir)}},
                        lora={"targets": "attn"}, train={"max_steps": 4, "save_steps": 4, "eval_steps": 0})
    trainer = train(load_recipe(path))
    base = tmp_path / "run" / "base"
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    assert json.loads((base / "config.json").read_text())["use_cache"] is True
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    torch.testing.assert_close(logits(loaded), logits(trainer.model), atol=1e-6, rtol=0)


def test_grad_accumulation_matches_one_larger_batch_and_eval_loss_ignores_batch_size(tmp_path, tokenizer_dir):
    """Rows of different lengths (no packing) hold different numbers of targets per micro-batch: Trainer's
    num_items_in_batch must normalise over the whole accumulated batch for 4 x 2 to equal 8 x 1.

    Bounds from measurements of this very run (20 Adam steps): the same 8 x 1 run at 2 threads instead of 1
    moves parameters by up to 1.1e-5 and losses by 5e-7 (float rounding, amplified by Adam where gradients
    are near zero); normalising per micro-batch instead (the bug) moves parameters by 8.8e-2 and losses by
    over 1. The bounds sit about 100x above the noise and 100x below the bug."""
    model = {"model": {"init": SCRATCH}, "tokenizer": {"path": str(tokenizer_dir)}}
    data = {"packing": False}
    one = train(load_recipe(write_recipe(tmp_path, model, name="one", data=data)))
    two = train(load_recipe(write_recipe(tmp_path, model, name="two", data=data,
                                         train={"batch_size": 4, "grad_accum": 2})))
    assert_learns(tmp_path / "one", drop=1.0)  # from scratch, full
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "two")),
                               torch.tensor(train_losses(tmp_path / "one")), atol=1e-4, rtol=0)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    by_batch = []
    for size in (3, 16):
        one.args.per_device_eval_batch_size = size
        by_batch.append(one.evaluate()["eval_loss"])
    # Batch 3 vs 16 changes only the float summation order (~1e-7 here); averaging per-batch means would
    # move it by ~1e-2.
    assert by_batch[0] == pytest.approx(by_batch[1], abs=1e-5)


def test_early_stopping_stops_when_validation_loss_stops_improving(tmp_path, tiny_model_dir):
    """lr 1.0 makes the model diverge: the validation loss rises after the first evaluation, so patience 1
    stops the run at the second one and final/ is the best (first) checkpoint."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}},
                        train={"lr": 1.0, "max_steps": 30, "eval_steps": 2, "save_steps": 2,
                               "early_stopping_patience": 1})
    trainer = train(load_recipe(path))
    assert trainer.state.global_step == 4
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Dropout on, an epoch boundary crossed, evaluation and best-checkpoint tracking on: the killed run,
    restarted, must log the same losses and end with the same weights as a run never interrupted."""
    model = {"model": {"base": str(tiny_model_dir)}}
    settings = {"max_steps": 40, "save_steps": 4, "eval_steps": 4, "save_total_limit": 3}
    killed = write_recipe(tmp_path, model, name="killed", train=settings)
    prepare(load_recipe(killed))
    process = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(killed)], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert first.is_file(), err.decode()[-2000:]
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"

    resumed = train(load_recipe(killed))
    uninterrupted = train(load_recipe(write_recipe(tmp_path, model, name="straight", train=settings)))
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [r["step"] for r in metrics(tmp_path / "straight")]
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "killed")),
                               torch.tensor(train_losses(tmp_path / "straight")), atol=1e-6, rtol=0)
    assert resumed.state.best_model_checkpoint.endswith(Path(uninterrupted.state.best_model_checkpoint).name)
    final_killed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    final_straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_killed[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("data.block_size=256", "above the model's context length (n_positions = 128)"),
    ("lora.targets=[attn.q_proj]", "'attn.q_proj' matches no module"),
    ("model.base={notmodel}", "is a folder but not a model"),
    ("model.base={adapter}", "is a LoRA adapter, not a whole model: merge it into its base first"),
    ("model.base={datafile}", "is a file, not a model folder"),
    ("train.resume={empty}", "holds no checkpoint"),
    ("train.extra.optimm=adamw_torch", "did you mean 'optim'"),
    ("train.extra.learning_rate=0.1", "set 'train.lr' instead"),
    ("train.extra.ddp_timeout=0", "'train.extra.ddp_timeout' must be a whole number of seconds above 0"),
    ("train.early_stopping_patience=2 train.eval_steps=0", "needs evaluation"),
    ("train.scheduler=bogus", "'train.scheduler' = 'bogus' is not a learning-rate schedule; use one of: linear,"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tiny_model_dir, capsys, override, message):
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}})
    override = override.format(notmodel=tmp_path / "notmodel", empty=tmp_path / "empty", adapter=tmp_path / "adapter",
                               datafile=tmp_path / "train.txt")
    assert cli.main(["train", str(path), *override.split()]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err
    if override.startswith(("train.scheduler", "data.block_size")):
        assert not (tmp_path / "run" / "prepared").exists()  # refused before any work


def test_auto_resume_refuses_checkpoints_of_other_data_or_settings(tmp_path, tiny_model_dir, capsys):
    """Editing the data or a training setting and training again must not continue (and pick a "best"
    checkpoint across) the old run; more steps may; train.resume=never starts over."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, train={"max_steps": 4, "save_steps": 2})
    train(load_recipe(path))
    assert cli.main(["train", str(path), "train.lr=1e-2"]) == 2
    assert "holds a run of other data or settings (changed: train)" in capsys.readouterr().err
    (tmp_path / "train.txt").write_text("\n".join(corpus_lines(300, seed=2)) + "\n")
    assert cli.main(["train", str(path)]) == 2
    assert "(changed: prepared data)" in capsys.readouterr().err
    assert cli.main(["train", str(path), "train.resume=never"]) == 0
    assert "starting over" in capsys.readouterr().out
    assert cli.main(["train", str(path), "train.max_steps=6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert train_losses(tmp_path / "run")[-1] is not None and metrics(tmp_path / "run")[-1]["step"] == 6


def test_training_a_finished_run_again_trains_nothing_and_rewrites_the_same_final(tmp_path, tiny_model_dir, capsys):
    """Trainer takes one step before it checks for the end: a finished run trained again (or killed between its
    last checkpoint and final/) must not train past train.max_steps; final/ comes from the best checkpoint again."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}},
                        train={"max_steps": 4, "save_steps": 2, "eval_steps": 2, "scheduler": "linear"})
    train(load_recipe(path))
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text()
    weights = (run / "final" / "model.safetensors").read_bytes()
    for final_present in (True, False):
        if not final_present:
            shutil.rmtree(run / "final")
        capsys.readouterr()
        assert cli.main(["train", str(path)]) == 0
        assert "already reached the last step (step 4 of 4): nothing to train" in capsys.readouterr().out
        assert (run / "metrics.jsonl").read_text() == lines
        assert not (run / "checkpoints" / "checkpoint-5").exists()
        assert (run / "final" / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_training_on_past_a_finished_run_follows_the_new_schedule_from_its_first_step(tmp_path, tiny_model_dir):
    """The resumed optimizer holds the old schedule's last learning rate (0 at the end of a cosine): the first new
    step must instead take the new schedule's rate, as every later step does."""
    model = {"model": {"base": str(tiny_model_dir)}}
    settings = {"save_steps": 2, "eval_steps": 0, "scheduler": "cosine"}
    extended = write_recipe(tmp_path, model, name="extended", train={**settings, "max_steps": 4})
    straight = write_recipe(tmp_path, model, name="straight", train={**settings, "max_steps": 8})
    train(load_recipe(extended))
    train(load_recipe(extended, ["train.max_steps=8"]))
    train(load_recipe(straight))
    rates = {name: {row["step"]: row["lr"] for row in metrics(tmp_path / name) if "lr" in row}
             for name in ("extended", "straight")}
    assert rates["extended"][4] < rates["straight"][4] / 2  # the first run's schedule ran down over 4 steps
    for step in range(5, 9):
        assert rates["extended"][step] == pytest.approx(rates["straight"][step], rel=1e-9), step


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_rerun_resumes(tmp_path, tiny_model_dir, capsys,
                                                                              monkeypatch):
    """safetensors reports a full disk as its own error type: it must read as the storage error it is, naming the
    checkpoints folder, and the rerun (with space again) resumes from the last complete checkpoint."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, train={"max_steps": 4, "save_steps": 2})
    save = transformers.modeling_utils.safe_save_file

    def fills_the_disk_at_step_4(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_the_disk_at_step_4)
    assert cli.main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'run' / 'checkpoints'}: No space left on device")
    assert "Traceback" not in err
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save)
    assert cli.main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out and (tmp_path / "run" / "final").is_dir()


def test_a_metrics_line_torn_by_a_kill_does_not_block_the_resume(tmp_path):
    """SIGKILL during a metrics.jsonl write leaves half a line: the resumed run keeps the whole lines up to its
    checkpoint and drops the torn one."""
    from types import SimpleNamespace

    from finetune.callbacks import MetricsFile

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsFile(path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is for machines without CUDA")
def test_float16_without_cuda_is_warned_about(tmp_path, tokenizer_dir):
    from finetune.modeling import load_base_model
    from finetune.tokenizer import load_tokenizer

    recipe = load_recipe(write_recipe(tmp_path, {"model": {"init": SCRATCH, "dtype": "float16"},
                                                 "tokenizer": {"path": str(tokenizer_dir)}}))
    with pytest.warns(UserWarning, match="float16 on a machine without CUDA"):
        load_base_model(recipe, load_tokenizer(str(tokenizer_dir)))


def test_eval_of_a_checkpoint_is_refused_once_the_data_changed(tmp_path, tiny_model_dir, capsys):
    """A checkpoint holds no tokenizer: eval accepts one of this run trained on the prepared data as it is, and
    refuses it after the data (and so possibly the tokenizer) changed, instead of scoring with the wrong one."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, train={"max_steps": 2, "save_steps": 2})
    train(load_recipe(path))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert cli.main(["eval", str(path), "--model", str(checkpoint), "eval.baseline=false"]) == 0
    (tmp_path / "train.txt").write_text("\n".join(corpus_lines(300, seed=5)) + "\n")
    assert cli.main(["eval", str(path), "--model", str(checkpoint)]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err


def test_resume_falls_back_from_a_checkpoint_whose_weights_are_truncated(tmp_path, tiny_model_dir, capsys):
    """A kill or a full disk during a save can leave trainer_state.json next to a truncated model file: resume
    skips that checkpoint, says so, and continues from the newest complete one."""
    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}},
                        train={"max_steps": 4, "save_steps": 2, "save_total_limit": None})
    train(load_recipe(path))
    weights = tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main(["train", str(path), "train.max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "model.safetensors is damaged or truncated" in out
    assert "resuming from" in out and "checkpoint-2" in out
    state = tmp_path / "run" / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    assert cli.main(["train", str(path), "train.max_steps=8"]) == 0
    out = capsys.readouterr().out
    assert "trainer_state.json is damaged or truncated" in out and "checkpoint-4" in out


@pytest.mark.slow
def test_killed_in_the_middle_of_checkpoint_saves_the_run_still_ends_like_an_uninterrupted_one(tmp_path,
                                                                                            tiny_model_dir):
    """SIGKILL twice, each the moment a checkpoint folder exists without its trainer_state.json (a save in
    progress): each rerun skips the partial checkpoint and resumes from a complete one, and the last rerun ends
    with the losses and weights of a run never interrupted."""
    model = {"model": {"base": str(tiny_model_dir)}}
    settings = {"max_steps": 40, "save_steps": 2, "save_total_limit": 3}
    killed = write_recipe(tmp_path, model, name="killed", train=settings)
    prepare(load_recipe(killed))
    folder = tmp_path / "killed" / "checkpoints"
    mid_save = 0
    for _ in range(2):
        process = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(killed)], env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            partial = [c for c in folder.glob("checkpoint-*") if c not in started
                       and not (c / "trainer_state.json").exists()] if folder.is_dir() else []
            if partial:
                process.send_signal(signal.SIGKILL)
                process.wait()
                mid_save += not (partial[0] / "trainer_state.json").exists()
                break
            time.sleep(0.001)
        assert process.returncode == -signal.SIGKILL, f"the run ended by itself (exit {process.returncode})"
    assert mid_save, "no kill landed inside a save"
    train(load_recipe(killed))
    train(load_recipe(write_recipe(tmp_path, model, name="straight", train=settings)))
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [r["step"] for r in metrics(tmp_path / "straight")]
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "killed")),
                               torch.tensor(train_losses(tmp_path / "straight")), atol=1e-6, rtol=0)
    final_killed = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "straight" / "final" / "model.safetensors").items():
        torch.testing.assert_close(final_killed[name], tensor, atol=1e-6, rtol=0)


def test_a_second_train_of_the_same_run_is_refused_while_one_runs(tmp_path, tiny_model_dir, capsys):

    path = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)}}, train={"max_steps": 2})
    with load_recipe(path).run.locked("train"):  # stands for a train process still running
        assert cli.main(["train", str(path)]) == 2
    assert "another train is running in" in capsys.readouterr().err
    assert cli.main(["train", str(path)]) == 0
