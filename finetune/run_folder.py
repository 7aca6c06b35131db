"""The layout of a run folder (outputs/<name>/, or the recipe's output_dir): every stage finds what another
wrote through this one object, so a name is spelled in one place. The README's "Outputs" section describes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPE_FILE = "recipe.yaml"  # the resolved recipe, beside the prepared data and in final/, merged/ and hub/
IDENTITY_FILE = "run.json"  # beside checkpoints: what they were trained from


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
    def merged(self) -> Path:
        return self.root / "merged"

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

    def lock(self, stage: str) -> Path:
        """Held while `stage` runs (prepare and train), so two of them never share the folder."""
        return self.root / f".{stage}.lock"

