"""Shared fixtures: a tiny GPT-2 and tokenizer saved to disk (loaded through the same paths as Hub models), and
finished runs of a tiny model that learned a word list, for the generate / chat / serve / merge / push tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from finished_runs import train_recital_base, write_finished_runs  # noqa: E402
from helpers import corpus_lines, save_tiny_gpt2, single_thread  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained on a small synthetic corpus, saved as a folder."""
    from finetune.tokenizer import train_tokenizer
    from finetune.recipe import TokenizerTrainConfig

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(corpus_lines(), TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (2 layers, 32 wide) with its tokenizer, saved like a Hub checkpoint."""
    from finetune.tokenizer import load_tokenizer

    return save_tiny_gpt2(load_tokenizer(str(tokenizer_dir)), tmp_path_factory.mktemp("tiny-gpt2"),
                          n_layer=2, n_head=2, n_embd=32, n_positions=128)


@pytest.fixture(scope="session")
def recital_base(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 trained to recite the word list, saved with its tokenizer."""
    with single_thread():
        return train_recital_base(tmp_path_factory.mktemp("recital-gpt2"), tokenizer_dir)


@pytest.fixture(scope="session")
def finished_runs(recital_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Recipe files of finished runs over `recital_base`: `lora`, `full` and `chat` (see finished_runs.py)."""
    with single_thread():
        return write_finished_runs(tmp_path_factory.mktemp("runs"), recital_base)
