"""Shared fixtures: a tiny GPT-2 and tokenizer saved to disk (loaded through the same paths as Hub models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SCRATCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,  # a from-scratch GPT-2, dropout off
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cyan magenta yellow black white good bad great awful").split()


def shared_path(relative: str) -> Path:
    """A file under ../shared/data, or skip the test when the shared data is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} is absent (shared data is not part of a fresh clone)")
    return path


def subprocess_env() -> dict:
    """For stages run as subprocesses: offline, this checkout's code, one thread (as `one_thread` here)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def one_thread():
    """The same arithmetic in this process and in the subprocesses (and no thread thrashing on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corpus_lines(n: int = 200, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained on a small synthetic corpus, saved as a folder."""
    from finetune.tokenizer import train_tokenizer
    from finetune.recipe import TokenizerTrainConfig

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(corpus_lines(), TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_gpt2(tokenizer, folder: Path, **config) -> Path:
    """A random GPT-2 (seed 0) for `tokenizer`, saved with it like a Hub checkpoint; `config` sets its shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id, **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (2 layers, 32 wide) with its tokenizer, saved like a Hub checkpoint."""
    from finetune.tokenizer import load_tokenizer

    return save_tiny_gpt2(load_tokenizer(str(tokenizer_dir)), tmp_path_factory.mktemp("tiny-gpt2"),
                          n_layer=2, n_head=2, n_embd=32, n_positions=128)
