"""The experiment trackers `train.report_to` may name, and whether each is installed (finetune/tracking.py runs
them; the recipe checks names against this table when it loads)."""

from __future__ import annotations

import importlib.util

from finetune.errors import UserError

# tracker -> (module it needs, pip package); "none" turns tracking off.
REPORTERS: dict[str, tuple[str, str] | None] = {
    "none": None, "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"),
}


def reporters(report_to: str | list) -> list[str]:
    """`train.report_to` as a list of tracker names, without "none"."""
    names = [report_to] if isinstance(report_to, str) else report_to
    return [name for name in names if name != "none"]


def check_installed(report_to: str | list, where: str) -> None:
    """Each tracker named must be importable (Trainer would fail only once training starts)."""
    for name in reporters(report_to):
        module, package = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{where}: 'train.report_to' = {name} needs the {package} package, which is not "
                            f"installed: pip install {package} (or set train.report_to=none)")
