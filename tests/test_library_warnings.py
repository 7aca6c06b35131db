"""No code under finetune/ uses a deprecated library API, and a run that does not use DeepSpeed does not import it.

The demo's path at tiny scale (pretrain from scratch, LoRA-tune a classifier on it, evaluate both, generate) runs in
this process with every warning recorded, and with transformers' logged deprecation notices. A deprecation counts
when finetune/ called into the library that issued it: outward from the warning, past that library's own frames
and the model-call plumbing (torch's Module.__call__, peft's forward wrappers), the next frame is in finetune/.
Deprecations raised inside the libraries' own code paths (peft reading a transformers property) do not count."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT, SCRATCH, WORDS, corpus_lines, subprocess_env, write_recipe_file

from finetune.cli import main

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
FINETUNE = ROOT / "finetune"
MODULE_CALL = Path("torch", "nn", "modules", "module.py")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def library(frame: traceback.FrameSummary) -> str:
    """The installed package a frame runs in, else its file's folder (finetune/..., the standard library)."""
    path = Path(frame.filename)
    if "site-packages" in path.parts:
        return path.parts[path.parts.index("site-packages") + 1]
    return str(path.parent)


def plumbing(frame: traceback.FrameSummary) -> bool:
    """Frames that only hand a model call on: torch's Module.__call__ and peft's wrappers' forward."""
    return frame.filename.endswith(str(MODULE_CALL)) or (library(frame) == "peft" and frame.name == "forward")


def caller(stack: list[traceback.FrameSummary]) -> traceback.FrameSummary:
    """The frame that called into the library that issued a warning (the innermost frame of `stack`)."""
    issuer = library(stack[-1])
    for frame in reversed(stack):
        if library(frame) != issuer and not plumbing(frame):
            return frame
    return stack[-1]


def in_finetune(frame: traceback.FrameSummary) -> bool:
    return Path(frame.filename).resolve().is_relative_to(FINETUNE)


def delivering_frames_dropped(stack: list[traceback.FrameSummary], module: ModuleType) -> list[traceback.FrameSummary]:
    """`stack` without its innermost frames in `module` (warnings or logging: they deliver the warning or record)."""
    while stack and stack[-1].filename == module.__file__:
        stack = stack[:-1]
    return stack


@contextmanager
def deprecations_from_finetune() -> Iterator[list[str]]:
    """Collects each deprecation warning or transformers deprecation notice whose caller is in finetune/."""
    found: list[str] = []

    def note(message: str, stack: list[traceback.FrameSummary]) -> None:
        here = caller(stack)
        if in_finetune(here):
            found.append(f"{message} (called from {here.filename}:{here.lineno})")

    def on_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DEPRECATIONS):
            note(f"{category.__name__}: {message}", delivering_frames_dropped(traceback.extract_stack()[:-1], warnings))

    class Notices(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and "deprecated" in record.getMessage():
                note(f"transformers notice: {record.getMessage()}",
                     delivering_frames_dropped(traceback.extract_stack()[:-1], logging))

    from transformers.utils import logging as transformers_logging

    transformers_logging.warning_once.cache_clear()  # notices already given in this process are given again
    notices, logger = Notices(), logging.getLogger("transformers")
    logger.addHandler(notices)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            yield found
    finally:
        logger.removeHandler(notices)


def write_demo(folder: Path) -> tuple[Path, Path]:
    """The demo's two recipes at tiny scale: a GPT-2 pretrained from scratch, and a LoRA classifier tuned on it."""
    (folder / "corpus.txt").write_text("\n".join(corpus_lines(200)) + "\n")
    for split, seed in (("train", 1), ("validation", 2)):
        rows = [{"review": line, "label": "good" if i % 2 else "bad"} for i, line in enumerate(corpus_lines(40, seed))]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    steps = {"max_steps": 4, "batch_size": 8, "logging_steps": 2, "eval_steps": 2, "save_steps": 4}
    pretrain = {"name": "pretrain", "output_dir": str(folder / "pretrain"), "model": {"init": SCRATCH},
                "tokenizer": {"train": {"vocab_size": 300, "min_frequency": 1}},
                "data": {"train": "corpus.txt", "format": "text", "block_size": 32}, "lora": None, "train": steps}
    tune = {"name": "tune", "output_dir": str(folder / "tune"), "model": {"base": str(folder / "pretrain" / "final")},
            "data": {"train": "train.jsonl", "validation": "validation.jsonl", "format": "classification",
                     "block_size": 32, "classification": {"text_field": "review", "labels": ["bad", "good"]}},
            "lora": {"r": 4, "alpha": 8, "targets": "all"}, "train": steps, "eval": {"shots": 2}}
    return write_recipe_file(folder / "pretrain.yaml", pretrain), write_recipe_file(folder / "tune.yaml", tune)


def test_no_code_under_finetune_calls_a_deprecated_library_api(tmp_path: Path, capsys) -> None:
    pretrain, tune = write_demo(tmp_path)
    with deprecations_from_finetune() as found:
        for command in (["train", pretrain], ["eval", pretrain], ["train", tune], ["eval", tune],
                        ["generate", pretrain, "--prompt", WORDS[0], "--num-samples", "2", "--max-new-tokens", "8"]):
            assert main([str(arg) for arg in command]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("sample") >= 2  # the generate command ran to its end
    assert not found, "\n".join(found)


def test_a_run_without_deepspeed_does_not_import_it(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")  # installed with the dev extras: accelerate imports it whenever it is present
    pretrain, _ = write_demo(tmp_path)
    script = ("import sys; from finetune.cli import main; code = main(['train', sys.argv[1]]); "
              "print('deepspeed imported' if 'deepspeed' in sys.modules else 'deepspeed not imported'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, str(pretrain)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "deepspeed not imported"
    assert "Setting accelerator" not in done.stderr
