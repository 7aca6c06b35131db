"""`eval.json`: the figures of an evaluation and the digest of the weights they were measured on, so that no
later stage publishes the figures of a model that has since been trained again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune.errors import UserError
from finetune.store import write_atomic


def weight_files_digest(folder: Path) -> str:
    """A digest of the weight files (*.safetensors) in a model, adapter or checkpoint folder."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def write_eval_results(path: Path, results: dict) -> None:
    write_atomic(path, json.dumps(results, indent=2).encode())


def read_eval_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): an evaluation was cut short; run finetune eval "
                        "again") from None
    if not isinstance(results, dict):
        raise UserError(f"{path} does not hold evaluation results (a JSON object): run finetune eval again")
    return results


def check_current(path: Path, results: dict, model: Path) -> None:
    """Refuse figures that were not measured on the weights now in `model`."""
    recorded = results.get("weights_digest")
    if recorded is None:
        raise UserError(f"{path} does not say which weights it scored (written by an earlier version): run "
                        "finetune eval again, or delete it to go on without figures")
    if recorded != weight_files_digest(model):
        raise UserError(f"{path} holds the figures of other weights than {model} (the model was trained again "
                        "after the last eval): run finetune eval again, or delete it to go on without figures")
