"""Make targets hand the text a user types (PROMPT, REPO, RECIPE) to the command as typed: neither make nor the
shell interprets it, while ARGS is still split into options and key=value overrides."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # real make targets, each a subprocess

# What a shell or make would act on: command substitution, parameters, quotes, separators, a newline, comments,
# escapes and make's own functions. At most 60 characters: generate's header shows that much of a prompt.
HOSTILE = ["`echo run` $(echo ran) $5 \"dq\" 'sq'; x # y",
           "a\nb \\ $$ $(shell echo made) ${HOME} * ? % & | > <"]


def make(target: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    """A real `make TARGET` of this checkout, with the running venv (its `.installed` stamp taken as current)."""
    venv = Path(sys.prefix)
    command = ["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.installed", f"VENV={venv}", target,
               *(f"{key}={value}" for key, value in variables.items())]
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_make_generate_passes_prompt_and_recipe_verbatim(finished_runs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / HOSTILE[0]  # a recipe path that needs quoting too
    folder.mkdir()
    recipe = shutil.copy(finished_runs["full"], folder / "recipe.yaml")  # its paths are absolute
    for prompt in HOSTILE:
        result = make("generate", tmp_path, RECIPE=str(recipe), PROMPT=prompt,
                      ARGS="--num-samples 2 --temperature 0 generate.max_new_tokens=1")
        assert result.returncode == 0, result.stderr
        assert f"=== {prompt!r} - sample 1/2" in result.stdout, result.stdout
        assert f"=== {prompt!r} - sample 2/2" in result.stdout, result.stdout


def test_make_push_passes_repo_verbatim(finished_runs: dict[str, Path], tmp_path: Path) -> None:
    for repo in HOSTILE:
        result = make("push", tmp_path, RECIPE=str(finished_runs["lora"]), REPO=repo, ARGS="--dry-run")
        assert result.returncode == 2, result.stderr
        assert f"error: --repo {repo!r} is not a Hub repository id" in result.stderr, result.stderr
    missing = make("push", tmp_path, RECIPE=str(finished_runs["lora"]), REPO="")
    assert missing.returncode != 0 and "push needs REPO=user/name" in missing.stderr


def test_make_export_passes_recipe_and_types(finished_runs: dict[str, Path], tmp_path: Path) -> None:
    result = make("export", tmp_path, RECIPE=str(finished_runs["full"]), TO="gguf", TYPES="q8_0")
    assert result.returncode == 0, result.stderr
    assert "model-q8_0.gguf: next-token log-probs within" in result.stdout, result.stdout
    missing = make("export", tmp_path, RECIPE=str(finished_runs["full"]))
    assert missing.returncode != 0 and "export needs TO=gguf or TO=onnx" in missing.stderr
