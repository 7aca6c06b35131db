"""Checkpoints of a run: which are complete, which one a run resumes from, and starting over.

checkpoints/ is scanned once per start (`plan_resume`); a checkpoint counts only when every file reads to its
end, and `auto` resumes only a run trained from the same data and settings (recorded in checkpoints/run.json).
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from transformers import Trainer

from finetune.distributed import is_main_process, main_print
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def newest_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` under `folder` that was completely written: trainer_state.json present
    (Trainer writes it last) and every weight and state file readable to its end. Newer, incomplete ones (a
    kill or a full disk during the save) are skipped, saying so."""
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        main_print(f"train: skipping {path}: {problem}")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it can). safetensors files are checked
    against their header (a truncated one no longer holds the data it declares), torch's zip files for their
    central directory (written last)."""
    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is damaged or truncated"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(file).close()
        except Exception as exc:  # noqa: BLE001 - any failure to read it means the file is damaged
            return f"{file.name} is damaged or truncated ({type(exc).__name__})"
    return None


# train.* keys a resumed run may change: how long it runs and what it logs and keeps, not what it computes.
RESUMABLE_KEYS = ("epochs", "max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                  "early_stopping_patience", "resume", "dataloader_workers", "eval_batch_size", "report_to", "run_name")


def run_identity(recipe: Recipe, manifest: dict) -> dict:
    """What a checkpoint's trajectory depends on: the prepared data and the model, tokenizer, LoRA and train
    settings (less RESUMABLE_KEYS)."""
    raw = recipe.to_dict()
    train_section = {k: v for k, v in raw["train"].items() if k not in RESUMABLE_KEYS}
    return json.loads(json.dumps({"prepared data": manifest["fingerprint"], "model": raw["model"],
                                  "tokenizer": raw["tokenizer"], "lora": raw["lora"], "train": train_section},
                                 default=str))


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: str | None  # what Trainer resumes from (None: step 0)
    start_over: bool  # checkpoints/ is emptied and the run's identity recorded before training
    had_checkpoints: bool  # there were complete checkpoints in checkpoints/


def plan_resume(recipe: Recipe, identity: dict) -> ResumePlan:
    """`train.resume`: auto (the newest checkpoint of this run, if any, and only if it was trained from the same
    data and settings), never, or a checkpoint (or folder of them), resumed as asked."""
    mode, folder = recipe.train.resume, recipe.run.checkpoints
    newest = newest_checkpoint(folder)
    if mode == "never" or (mode == "auto" and newest is None):
        return ResumePlan(None, start_over=True, had_checkpoints=newest is not None)
    if mode == "auto":
        record = recipe.run.identity
        recorded = json.loads(record.read_text()) if record.is_file() else None
        if recorded != identity:
            changed = f"unknown (no {record})" if recorded is None else ", ".join(
                key for key in identity if recorded.get(key) != identity.get(key))
            raise UserError(f"{recipe.source}: {folder} holds a run of other data or settings (changed: {changed}); "
                            "set train.resume=never to start over, or train.resume=<checkpoint> to continue it "
                            "anyway")
        return ResumePlan(str(newest), start_over=False, had_checkpoints=True)
    path = Path(mode)
    found = path if (path / "trainer_state.json").is_file() else newest_checkpoint(path)
    if found is None:
        raise UserError(f"{recipe.source}: 'train.resume' = {mode!r} holds no checkpoint (no trainer_state.json in "
                        "it or in a checkpoint-N folder under it); use auto, never or a checkpoint folder")
    return ResumePlan(str(found), start_over=newest is None, had_checkpoints=newest is not None)


def clear_checkpoints(trainer: Trainer, run: RunFolder, identity: dict, had_checkpoints: bool) -> None:
    """A fresh run must not leave an older run's checkpoints for `auto` to pick up; it records what it trains
    from, so that `auto` resumes only the same run."""
    if is_main_process():
        if had_checkpoints:
            print(f"train: starting over: removing the old checkpoints in {run.checkpoints}")
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        run.checkpoints.mkdir(parents=True)
        run.identity.write_text(json.dumps(identity, indent=1))
    trainer.accelerator.wait_for_everyone()
