"""Distributed training without GPUs: every launcher accelerate offers (DDP, FSDP, DeepSpeed ZeRO, MPI, two
machines) runs as gloo CPU ranks and must train exactly what one process trains at the same global batch, with the
run folder written once; a killed launch resumes where an uninterrupted one ends; broken launches fail clearly.

Bounds, measured on tiny from-scratch GPT-2 runs of 20 steps (dropout off): one process at 1 and at 2 threads
differs by up to 4.8e-7 in a logged loss and 9.1e-6 in a final weight; DDP, FSDP, ZeRO-2/3, MPI and two machines
differ from one process by up to 1.9e-6 (loss) and 1.1e-5 (weight). The bounds give 10x headroom over those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import ROOT, SCRATCH, corpus_lines, subprocess_env, write_recipe_file
from preference_pairs import separable_pairs
from rl_runs import write_rl_run
from finetune.errors import UserError
from finetune.prepare import ensure_prepared, prepare
from finetune.recipe import load_recipe
from finetune.checkpoints import newest_checkpoint
from finetune.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
BIN = Path(sys.executable).parent
LOSS_BOUND, WEIGHT_BOUND = 2e-5, 1e-4
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
SETUPS = ROOT / "recipes" / "accelerate"
PROGRESS = re.compile(r"\d+%\|.*\||\[A$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_recipe(folder: Path, tokenizer_dir: Path, name: str, batch_size: int, lora: dict | None = None,
                 **train_settings) -> Path:
    """Full fine-tuning (or LoRA) of a from-scratch model; global batch 8 = batch_size x processes."""
    data = folder / "train.txt"
    if not data.exists():
        data.write_text("\n".join(corpus_lines(300, seed=1)) + "\n")
    raw = {"name": name, "model": {"init": SCRATCH},
           "tokenizer": {"path": str(tokenizer_dir)}, "data": {"train": str(data), "block_size": 32}, "lora": lora,
           "train": {"max_steps": 20, "lr": 3e-3, "batch_size": batch_size, "logging_steps": 1, "save_steps": 5,
                     "scheduler": "constant", "seed": 0, **train_settings}}
    return write_recipe_file(folder / f"{name}.yaml", raw)


def launch(recipe: Path, *options: str, port: int | None = None, log: Path | None = None):
    """`accelerate launch` of 2 processes in all (over every machine) training `recipe`: the finished process, or
    with a `log` file for its output, the running launcher."""
    command = [str(BIN / "accelerate"), "launch", *options, "--num_processes", "2",
               "--main_process_port", str(port or free_port()), "-m", "finetune", "train", str(recipe)]
    if log is not None:  # a file, not a pipe: a pipe nobody reads yet would fill and stall the ranks
        with log.open("w") as output:
            return subprocess.Popen(command, env=subprocess_env(), stdout=output, stderr=subprocess.STDOUT)
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def messages(*outputs: str) -> str:
    """What the ranks said, without progress bars (a failing rank's error line must not scroll out of view)."""
    lines = (line for text in outputs for line in text.replace("\r", "\n").splitlines())
    said = [line for line in lines if line.strip() and not PROGRESS.search(line)]
    return "\n".join(said)[-8000:]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path, loss_bound: float = LOSS_BOUND,
                    weight_bound: float = WEIGHT_BOUND) -> None:
    rows, expected = metrics(run), metrics(reference)
    assert [(r["step"], sorted(r)) for r in rows] == [(r["step"], sorted(r)) for r in expected]  # each line once
    for key in ("loss", "eval_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows if key in r]),
                                   torch.tensor([r[key] for r in expected if key in r]), atol=loss_bound, rtol=0)
    weights_file = next((reference / "final").glob("*.safetensors")).name
    got, want = load_file(run / "final" / weights_file), load_file(reference / "final" / weights_file)
    for name, tensor in want.items():
        torch.testing.assert_close(without_key_bias(name, got[name]), without_key_bias(name, tensor),
                                   atol=weight_bound, rtol=0, msg=name)


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The attention's key bias has no true gradient (it adds the same amount to every score of a query, which
    softmax cancels), so Adam turns its rounding noise into full-size steps: 1e-4 apart after 20 steps of a reward
    model (1 vs 2 processes) while the rest of the weights agree to 5e-6. It is left out of the comparison."""
    if not name.endswith("attn.c_attn.bias"):
        return tensor
    query, _, value = tensor.chunk(3)
    return torch.cat([query, value])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    """One-process reference runs (full fine-tuning and LoRA), made once for the module."""
    folder = tmp_path_factory.mktemp("distributed")
    for name, lora in (("one", None), ("one-lora", LORA)):
        train(load_recipe(write_recipe(folder, tokenizer_dir, name, 8, lora)))
    return folder


def deepspeed_usable() -> str | None:
    """Why DeepSpeed cannot run here (it JIT-compiles its CPU communication op), or None."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "deepspeed is not installed (pip install -e '.[deepspeed]')"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "DeepSpeed builds a C++ op at start-up and no C++ compiler is on PATH"
    return None


def launched_run(runs: Path, tokenizer_dir: Path, name: str, setup: str, lora: dict | None = None) -> str:
    """Train `name` with a 2-process launch of `setup` (a launch flag or a shipped config); its output."""
    recipe = write_recipe(runs, tokenizer_dir, name, 4, lora)
    prepare(load_recipe(recipe))  # once, before the launch, as `make train` does
    options = [setup] if setup.startswith("--") else ["--config_file", str(SETUPS / setup)]
    result = launch(recipe, *options)
    assert result.returncode == 0, messages(result.stdout, result.stderr)
    return result.stdout


@pytest.mark.parametrize("setup, engine, lora", [
    ("--multi_gpu", "MULTI_CPU", None),
    ("fsdp.yaml", "FSDP", LORA),
    ("deepspeed-zero2.yaml", "DEEPSPEED", None),
    ("deepspeed-zero3.yaml", "DEEPSPEED", None),
], ids=["ddp", "fsdp-lora", "zero2", "zero3"])  # full FSDP: the killed-and-resumed test below
def test_a_two_process_launch_trains_what_one_process_trains(runs, tokenizer_dir, setup, engine, lora):
    if engine == "DEEPSPEED" and (reason := deepspeed_usable()):
        pytest.skip(reason)
    name = f"{setup.split('.')[0].strip('-')}-{'lora' if lora else 'full'}"
    output = launched_run(runs, tokenizer_dir, name, setup, lora)
    assert f"2 processes, {engine} over gloo" in output  # the launcher's engine really ran
    assert_same_run(runs / name, runs / ("one-lora" if lora else "one"))
    final = runs / name / "final"
    if lora:
        from peft import AutoPeftModelForCausalLM

        assert AutoPeftModelForCausalLM.from_pretrained(final).peft_config["default"].r == LORA["r"]
    else:
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(final)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as trained


def kill_after_first_checkpoint(recipe: Path, options: list[str], log: Path) -> Path:
    """Launch `recipe` on 2 processes and SIGKILL the launcher and both ranks once a checkpoint is complete; that
    checkpoint."""
    process = launch(recipe, *options, log=log)
    run = load_recipe(recipe).run
    deadline = time.monotonic() + 300
    while newest_checkpoint(run.checkpoints) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for doomed in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        doomed.kill()  # the launcher and both ranks (in sessions of their own)
    process.wait()
    assert not run.final.exists(), "the run finished before it could be killed"
    survivor = newest_checkpoint(run.checkpoints)
    assert survivor is not None, messages(log.read_text())
    return survivor


def test_fsdp_killed_after_a_checkpoint_resumes_to_where_one_uninterrupted_process_ends(runs, tokenizer_dir):
    """Full fine-tuning under FSDP, killed after its first checkpoint and launched again, ends as the one-process
    run ends (an uninterrupted FSDP run matches the resumed one to 1e-6: resuming adds nothing to FSDP's own
    difference from one process)."""
    recipe = write_recipe(runs, tokenizer_dir, "fsdp-killed", 4)
    prepare(load_recipe(recipe))
    options = ["--config_file", str(SETUPS / "fsdp.yaml")]
    survivor = kill_after_first_checkpoint(recipe, options, runs / "fsdp-killed.log")
    result = launch(recipe, *options)
    assert result.returncode == 0, messages(result.stdout, result.stderr)
    assert f"resuming from {survivor}" in result.stdout and "2 processes, FSDP over gloo" in result.stdout
    assert_same_run(runs / "fsdp-killed", runs / "one")


def write_pairs_recipe(folder: Path, tokenizer_dir: Path, name: str, batch_size: int, objective: str,
                       lora: dict | None) -> Path:
    """`write_recipe` on separable preference pairs, trained with `objective`."""
    data = folder / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in separable_pairs(160, seed=3)))
    recipe = write_recipe(folder, tokenizer_dir, name, batch_size, lora, objective=objective)
    raw = yaml.safe_load(recipe.read_text())
    # rows of 64 tokens hold 1 to 3 pairs: the processes' batches hold different numbers of pairs
    raw["data"] = {"train": str(data), "format": "preference", "block_size": 64, "validation_fraction": 0.1}
    raw["train"]["eval_steps"] = 5
    return write_recipe_file(recipe, raw)


@pytest.mark.parametrize("objective, lora, killed, setup", [
    ("dpo", LORA, False, "--multi_gpu"), ("reward", None, False, "--multi_gpu"), ("dpo", None, True, "--multi_gpu"),
    ("dpo", None, False, "fsdp.yaml")], ids=["dpo-lora", "reward-full", "dpo-full-killed-and-resumed", "dpo-fsdp"])
def test_preference_objectives_on_two_processes_train_what_one_process_trains(tmp_path, tokenizer_dir, objective,
                                                                              lora, killed, setup):
    """DDP (and FSDP) of the preference trainer: both ranks' pairs in the loss and the logged pair metrics, the
    reference the adapter switched off (LoRA) or a frozen copy of the base taken before a resume loads the
    checkpoint."""
    one = write_pairs_recipe(tmp_path, tokenizer_dir, "one", 8, objective, lora)
    train(load_recipe(one))
    two = write_pairs_recipe(tmp_path, tokenizer_dir, "two", 4, objective, lora)
    prepare(load_recipe(two))
    options = [setup] if setup.startswith("--") else ["--config_file", str(SETUPS / setup)]
    if killed:
        survivor = kill_after_first_checkpoint(two, options, tmp_path / "killed.log")
    result = launch(two, *options)
    assert result.returncode == 0, messages(result.stdout, result.stderr)
    assert f"2 processes, {'FSDP' if 'fsdp' in setup else 'MULTI_CPU'} over gloo" in result.stdout
    if killed:
        assert f"resuming from {survivor}" in result.stdout
    assert_same_run(tmp_path / "two", tmp_path / "one")
    logged = [[row["rewards/margins"] for row in metrics(run) if "loss" in row] for run in (tmp_path / "two",
                                                                                            tmp_path / "one")]
    # the margins reach ~3 (reward model), where 1 and 2 processes differ by up to 4e-5 of their size: 5x headroom
    torch.testing.assert_close(torch.tensor(logged[0]), torch.tensor(logged[1]), atol=LOSS_BOUND, rtol=2e-4)
    assert logged[0][-1] > logged[0][0] + 0.05, logged[0]  # and it learned: the chosen rewarded over the rejected


def test_two_machines_train_what_one_process_trains_and_write_the_run_once(runs, tokenizer_dir):
    """Two `accelerate launch --num_machines 2` on one host, one process each, as `make train NNODES=2` starts
    them, over one prepared run folder (as on a shared filesystem)."""
    recipe = write_recipe(runs, tokenizer_dir, "two-machines", 4)
    prepare(load_recipe(recipe))
    port = free_port()
    nodes = []
    for rank in (0, 1):
        nodes.append(launch(recipe, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                            "--main_process_ip", "127.0.0.1", port=port, log=runs / f"two-machines-{rank}.log"))
    for node in nodes:
        node.wait(timeout=600)
    outputs = [(runs / f"two-machines-{rank}.log").read_text() for rank in (0, 1)]
    assert [node.returncode for node in nodes] == [0, 0], messages(*outputs)
    assert "2 processes, MULTI_CPU over gloo" in outputs[0]
    assert "train: wrote" in outputs[0] and "train: wrote" not in outputs[1]
    assert_same_run(runs / "two-machines", runs / "one")


def test_mpi_launch_of_the_multi_cpu_setup_trains_what_one_process_trains(runs, tokenizer_dir):
    mpirun = shutil.which("mpirun", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if mpirun is None:
        pytest.skip("no mpirun (pip install mpich)")
    recipe = write_recipe(runs, tokenizer_dir, "mpi", 4)
    prepare(load_recipe(recipe))
    hosts = runs / "hostfile"
    hosts.write_text("localhost:2\n")
    setup = runs / "multi-cpu.yaml"
    setup.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "num_machines": 1, "mixed_precision": "no",
                                     "use_cpu": True}))
    env = {**subprocess_env(), "PATH": f"{Path(mpirun).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", str(setup), "--num_processes", "2",
                             "--mpirun_hostfile", str(hosts), "--main_process_port", str(free_port()), "-m", "finetune",
                             "train", str(recipe)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, messages(result.stdout, result.stderr)
    assert "2 processes, MULTI_CPU over gloo" in result.stdout
    assert_same_run(runs / "mpi", runs / "one")


def test_a_multi_cpu_launch_without_mpi_is_refused_before_any_work(runs, tokenizer_dir):
    """accelerate's MULTI_CPU setup without an MPI launcher starts one plain process per machine: each would
    prepare, train on all the data and write the same run folder."""
    recipe = write_recipe(runs, tokenizer_dir, "multi-cpu-no-mpi", 4)
    setup = runs / "multi-cpu-machines.yaml"
    setup.write_text(yaml.safe_dump({"distributed_type": "MULTI_CPU", "num_machines": 2, "machine_rank": 0,
                                     "main_process_ip": "127.0.0.1", "mixed_precision": "no", "use_cpu": True}))
    result = launch(recipe, "--config_file", str(setup))
    assert result.returncode != 0
    assert "nothing gave it a rank or a world size" in result.stdout + result.stderr
    assert not (runs / "multi-cpu-no-mpi" / "prepared").exists()


def test_when_a_rank_dies_the_launch_ends_with_an_error_instead_of_hanging(runs, tokenizer_dir):
    recipe = write_recipe(runs, tokenizer_dir, "dies", 4, max_steps=100_000, save_steps=100_000)
    prepare(load_recipe(recipe))
    process = launch(recipe, "--multi_gpu", log=runs / "dies.log")
    deadline = time.monotonic() + 300
    while not (runs / "dies" / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    rank1 = next(child for child in psutil.Process(process.pid).children(recursive=True)
                 if child.environ().get("RANK") == "1")
    rank1.kill()
    killed = time.monotonic()
    process.wait(timeout=120)
    output = (runs / "dies.log").read_text()
    assert process.returncode != 0
    assert time.monotonic() - killed < 60
    assert "Signal 9 (SIGKILL)" in output


def test_ranks_refuse_missing_or_stale_prepared_data(tmp_path, tokenizer_dir):
    recipe = load_recipe(write_recipe(tmp_path, tokenizer_dir, "run", 8))
    with pytest.raises(UserError, match="missing.*finetune prepare"):
        ensure_prepared(recipe, processes=2)
    prepare(recipe)
    assert ensure_prepared(recipe, processes=2)["fingerprint"]
    (tmp_path / "train.txt").write_text("\n".join(corpus_lines(300, seed=2)) + "\n")
    with pytest.raises(UserError, match="stale"):
        ensure_prepared(recipe, processes=2)


def write_rl_recipe(folder: Path, model: Path, name: str, batch_size: int, objective: str, lora: dict | None,
                    **rl) -> Path:
    """`rl_runs.write_rl_run` for 6 steps of `batch_size` prompts (x 4 completions) per process, within the first
    epoch (about 58 training prompts): a short last batch is filled up with repeated prompts by a 2-process loader."""
    recipe = write_rl_run(folder, model, name, objective, prompts=64, group_size=4, **rl)
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(max_steps=6, batch_size=batch_size)
    raw["lora"] = lora
    return write_recipe_file(recipe, raw)


@pytest.mark.parametrize("objective, lora, rl", [("grpo", LORA, {}), ("rloo", None, {"normalize_advantages": True})],
                         ids=["grpo-lora", "rloo-normalized-full"])
def test_reward_rl_on_two_processes_trains_what_one_process_trains(tmp_path, tiny_model_dir, objective, lora, rl):
    """DDP of the RL trainer at the same global batch (8 prompts): each completion seeded by (step, prompt, sample)
    whatever rank samples it, group statistics within a prompt's group, batch statistics (RLOO's standardised
    advantages) and logged figures over both ranks. Measured (6 steps): 2 processes against 1 differ by up to 1.3e-8
    in a logged loss, 6.9e-8 in kl or entropy, 1.1e-6 in a weight (the key bias, left out, 2.8e-5), and the rewards
    and lengths not at all; 1 process at 1 and at 2 threads by up to 1.3e-8, 7.2e-8 and 5.8e-7. Bounds: about 10x
    those. Without the fix, RLOO's advantages standardised per rank made the gradient norm differ at step 2. With
    LoRA (GRPO; the reference is the adapter switched off on each rank): 3.4e-9 in a loss, 2.6e-8 in entropy, 9.8e-7
    in an adapter weight (LoRA B moved to 0.029 from 0)."""
    one = write_rl_recipe(tmp_path, tiny_model_dir, "one", 8, objective, lora, **rl)
    train(load_recipe(one))
    two = write_rl_recipe(tmp_path, tiny_model_dir, "two", 4, objective, lora, **rl)
    prepare(load_recipe(two))
    result = launch(two, "--multi_gpu")
    assert result.returncode == 0, messages(result.stdout, result.stderr)
    assert_same_run(tmp_path / "two", tmp_path / "one", loss_bound=1e-6, weight_bound=1e-5)
    logged = [[[row[key] for key in ("reward", "reward_std", "kl", "entropy", "completions/mean_length")]
               for row in metrics(run) if "loss" in row] for run in (tmp_path / "two", tmp_path / "one")]
    torch.testing.assert_close(torch.tensor(logged[0]), torch.tensor(logged[1]), atol=1e-6, rtol=0)
    assert any(row[0] > 0 for row in logged[1])  # some completion was rewarded: the advantages were not all 0
