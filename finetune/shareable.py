"""What leaves this machine (a merged model, an upload) carries no local paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from finetune.run_folder import RECIPE_FILE


def write_shareable_recipe(final: Path, folder: Path, hub_base: str | None = None) -> None:
    """final/'s recipe in `folder`, without this machine's paths (a merged model or an upload is for others);
    `hub_base` names the Hub model the base folder is a copy of."""
    if not (final / RECIPE_FILE).is_file():
        return
    shared = without_local_paths(yaml.safe_load((final / RECIPE_FILE).read_text()))
    if hub_base and shared["model"].get("base"):
        shared["model"]["base"] = hub_base
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(shared, sort_keys=False, allow_unicode=True))


def without_local_paths(value: Any) -> Any:
    """A copy fit to publish: absolute paths of this machine (data files, run and base folders) reduced to their
    last component, and `output_dir` dropped; dictionary keys (eval.files names) alike."""
    if isinstance(value, dict):
        return {without_local_paths(k): without_local_paths(v) for k, v in value.items() if k != "output_dir"}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value
