"""Helpers the tests share (plain functions and constants; the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SCRATCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,  # a from-scratch GPT-2, dropout off
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white good bad great awful").split()
RECITAL = " ".join(WORDS)


def shared_path(relative: str) -> Path:
    """A file under ../shared/data, or skip the test when the shared data is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} is absent (shared data is not part of a fresh clone)")
    return path


def subprocess_env() -> dict:
    """For stages run as subprocesses: offline, this checkout's code, one thread (as `one_thread` here)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """The same arithmetic in this process and in the subprocesses (and no thread thrashing on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def background_server(app) -> Iterator[str]:
    """The app (ASGI) served by uvicorn in a thread on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def corpus_lines(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def save_tiny_gpt2(tokenizer, folder: Path, **config) -> Path:
    """A random GPT-2 (seed 0) for `tokenizer`, saved with it like a Hub checkpoint; `config` sets its shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id, **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe_file(path: Path, raw: dict) -> Path:
    """The one recipe writer of the tests: `raw` (a recipe as data) as YAML at `path`; its run folder defaults to
    `<the file's folder>/<name>`."""
    raw = {"output_dir": str(path.parent / raw["name"]), **raw}
    path.write_text(yaml.safe_dump(raw))
    return path


def write_recipe(tmp_path: Path, model: dict, name: str = "run", **sections) -> Path:
    """A recipe file for a 20-step full fine-tuning run of `model` on 300 corpus lines in `tmp_path`; `sections`
    update its top-level sections."""
    train_file = tmp_path / "train.txt"
    if not train_file.exists():
        train_file.write_text("\n".join(corpus_lines(300, seed=1)) + "\n")
    raw = {"name": name, **model, "data": {"train": str(train_file), "block_size": 32}, "lora": None,
           "train": {"max_steps": 20, "lr": 3e-3, "batch_size": 8, "logging_steps": 1, "save_steps": 10,
                     "scheduler": "constant", "seed": 0}}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return write_recipe_file(tmp_path / f"{name}.yaml", raw)


def trl_deprecations(test):
    """TRL 1.16's configs and trainers still use transformers' deprecated `gradient_checkpointing` names: their
    FutureWarnings are TRL's, not ours."""
    for message in ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated"):
        test = pytest.mark.filterwarnings(f"ignore:{message}:FutureWarning")(test)
    return test
