"""The layout of a run folder (outputs/<name>/, or the recipe's output_dir): every stage finds what another
wrote through this one object, so a name is spelled in one place. The README's "Outputs" section describes it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

RECIPE_FILE = "recipe.yaml"  # the resolved recipe, beside the prepared data and in final/, merged/ and hub/
IDENTITY_FILE = "run.json"  # beside checkpoints: what they were trained from
OWNED_FILE = ".finetune-owned.json"  # the entries of the run folder that finetune wrote, so may replace or remove
# What marks a run folder written before OWNED_FILE existed: its entries of the layout are then adopted.
EARLIER_RUN_MARKS = ("prepared/manifest.json", "checkpoints/run.json", "final/recipe.yaml")
LAYOUT = ("prepared", "prepared.partial", "checkpoints", "final", "base", "merged", "hub", "reference", "metrics.jsonl",
          "loss.png", "eval.json", "report.md", "tensorboard", ".prepare.lock", ".train.lock")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def prepared(self) -> Path:
        """The tokenized, packed token store (finetune/store.py) and the tokenizer it was made with."""
        return self.root / "prepared"

    @property
    def prepared_partial(self) -> Path:
        """Where prepare writes until the store is whole; a killed prepare continues from it."""
        return self.root / "prepared.partial"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def identity(self) -> Path:
        """What the checkpoints were trained from (prepared data and settings): auto-resume compares it."""
        return self.checkpoints / IDENTITY_FILE

    @property
    def final(self) -> Path:
        """The trained model (or adapter) with its tokenizer and recipe."""
        return self.root / "final"

    @property
    def base(self) -> Path:
        """A from-scratch model as initialized, the base a LoRA adapter points at."""
        return self.root / "base"

    @property
    def reference_logps(self) -> Path:
        """The reference model's log-probabilities of the prepared sequences, computed once
        (`train.preference.precompute_reference`; finetune/reference_logps.py)."""
        return self.root / "reference" / "logps.npz"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        """`export --to gguf`: one .gguf file per tensor type and an Ollama Modelfile (finetune/export/gguf.py)."""
        return self.root / "gguf"

    @property
    def onnx(self) -> Path:
        """`export --to onnx`: the model with past key values, its config and tokenizer (finetune/export/onnx.py)."""
        return self.root / "onnx"

    @property
    def hub(self) -> Path:
        """What `push` uploads."""
        return self.root / "hub"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval_results(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def lock_file(self, stage: str) -> Path:
        return self.root / f".{stage}.lock"

    @contextmanager
    def locked(self, stage: str, wait: bool = False) -> Iterator[None]:
        """One `stage` at a time per run folder (prepare and train; released by the OS when the process dies):
        refused while another holds it, or with `wait`, after it (then finding its result)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.claim(self.lock_file(stage))
        with self.lock_file(stage).open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise UserError(f"another {stage} is running in {self.root}; wait for it to finish") from None
                print(f"{stage}: waiting for another {stage} in {self.root} to finish", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def claim(self, *paths: Path) -> None:
        """Call before writing, replacing or removing `paths` (entries of the run folder, or paths inside them).
        An entry becomes finetune's when it does not exist yet; an existing entry that finetune did not write (in
        a user's folder given as output_dir) is refused, naming it. Only the main process calls this."""
        owned = self._owned()
        new = {self._entry(path) for path in paths} - owned
        for entry in sorted(new):
            existing = self.root / entry
            if existing.exists() or existing.is_symlink():
                raise UserError(f"{existing} exists and was not written by finetune, which only replaces what it "
                                "wrote: move it away, or set output_dir to another folder")
        if new:
            self._record(owned | new)

    def owns(self, path: Path) -> bool:
        return self._entry(path) in self._owned()

    def replace(self, dest: Path, staging: Path) -> None:
        """Put the finished folder `staging` at `dest` in place of the old one (both finetune's). The old one is
        renamed aside first, so `dest` never holds a mix of the two; what a kill leaves aside is removed later."""
        aside = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        self.claim(staging, dest, aside)
        if dest.exists():
            os.rename(dest, aside)
        os.rename(staging, dest)
        shutil.rmtree(aside, ignore_errors=True)

    @contextmanager
    def staged(self, dest: Path) -> Iterator[Path]:
        """Write `dest` (an entry of the run folder) as a fresh `<dest>.tmp` folder, yielded; when the block ends
        well it replaces `dest` (`replace`), when it raises (a failed check, Ctrl-C) it is removed and `dest` stays
        as it was."""
        staging = dest.with_name(f"{dest.name}.tmp")
        self.claim(staging, dest)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.replace(dest, staging)

    def remove_leftovers(self, dest: Path) -> None:
        """Old copies of `dest` that a killed `replace` left aside (only finetune's own)."""
        for leftover in self.root.glob(f"{dest.name}.old-*"):
            if self.owns(leftover):
                shutil.rmtree(leftover, ignore_errors=True)

    def _entry(self, path: Path) -> str:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).parts[0]

    def _owned(self) -> set[str]:
        ledger = self.root / OWNED_FILE
        try:
            return set(json.loads(ledger.read_text()))
        except FileNotFoundError:
            if any((self.root / mark).is_file() for mark in EARLIER_RUN_MARKS):
                return {name for name in LAYOUT if (self.root / name).exists()}
            return set()
        except (ValueError, TypeError):
            raise UserError(f"{ledger} is not the list of entries finetune wrote (a JSON list of names); delete "
                            "the run folder's entries you no longer need and the file, then run again") from None

    def _record(self, owned: set[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ledger = self.root / OWNED_FILE
        tmp = ledger.with_name(f"{OWNED_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(owned), indent=1))
        os.replace(tmp, ledger)

