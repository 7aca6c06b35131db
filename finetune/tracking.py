"""Experiment tracking (`train.report_to`): Trainer's own integrations, writing under the run folder and offline
unless a tracking service is configured and reachable; a tracker that fails is switched off, never the run.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlparse

from transformers import Trainer, TrainerCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from finetune.recipe import Recipe
from finetune.report import samples_table
from finetune.trackers import reporters
from finetune.run_folder import RunFolder

PROBE_SECONDS = 3.0


def reachable(url: str) -> bool:
    """Whether a TCP connection to the URL's host and port opens within PROBE_SECONDS."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def _note(message: str) -> None:
    print(f"train: {message}", file=sys.stderr)


def _wandb_logged_in(url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def defaults(recipe: Recipe) -> dict[str, str]:
    """The trackers' environment settings for this run, for the variables the user has not set: TensorBoard
    events in `tensorboard/`; W&B files in `wandb/`, offline without a login or a reachable server; MLflow in the
    SQLite store `mlflow.db` unless MLFLOW_TRACKING_URI names a reachable server; Trackio in `trackio/`."""
    run = RunFolder(recipe.run.root.resolve())
    names = reporters(recipe.train.report_to)
    env: dict[str, str] = {}
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = str(run.tensorboard)
    if "wandb" in names:
        env["WANDB_DIR"] = str(run.root)
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        problem = None if "WANDB_MODE" in os.environ else "no login" if not _wandb_logged_in(url) else \
            None if reachable(url) else f"{url} is unreachable"
        if problem:
            env["WANDB_MODE"] = "offline"
            _note(f"W&B: {problem}, logging offline to {run.root / 'wandb'} (upload later with `wandb sync`)")
    if "mlflow" in names:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{run.root / 'mlflow.db'}"
    if "trackio" in names:
        env["TRACKIO_DIR"] = str(run.root / "trackio")
    env = {key: value for key, value in env.items() if key not in os.environ}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in names and uri.startswith(("http://", "https://")) and not reachable(uri):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{run.root / 'mlflow.db'}"
        _note(f"MLflow: {uri} is unreachable, logging to {env['MLFLOW_TRACKING_URI']}")
    return env


@contextlib.contextmanager
def environment(recipe: Recipe) -> Iterator[None]:
    """Run the block with `defaults(recipe)` in the environment (where Trainer's integrations read their settings),
    then restore it."""
    before = dict(os.environ)
    os.environ.update(defaults(recipe))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


# the trackers that show a text value (the others record numbers)
TEXT_TRACKERS = tuple(INTEGRATION_TO_CALLBACK[name] for name in ("tensorboard", "wandb", "trackio"))


class Guarded(TrainerCallback):
    """A tracker callback whose failure (a service gone mid-run, a full disk) is reported once and then ignored:
    tracking never ends a run."""

    def __init__(self, inner: TrainerCallback) -> None:
        self.inner = inner
        self.failed = False

    def call(self, event: str, args, state, control, **kwargs):
        if self.failed:
            return None
        try:
            return getattr(self.inner, event)(args, state, control, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracker failure: report it and train on
            self.failed = True
            _note(f"{type(self.inner).__name__} failed in {event} and is off for the rest of the run: "
                  f"{type(exc).__name__}: {exc}")
            return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Reward RL's completions sampled in training reach the trackers that show text, as a markdown table."""
        if logs and "samples" in logs:
            samples, logs = logs["samples"], {key: value for key, value in logs.items() if key != "samples"}
            if isinstance(self.inner, TEXT_TRACKERS):
                logs["samples"] = "\n".join(samples_table(samples))
        return self.call("on_log", args, state, control, logs=logs, **kwargs)


def _delegate(event: str):
    return lambda self, args, state, control, **kwargs: self.call(event, args, state, control, **kwargs)


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_") and name != "on_log"]:
    setattr(Guarded, _event, _delegate(_event))


def guard(trainer: Trainer) -> None:
    """Wrap the trainer's tracker callbacks (those `report_to` added) in Guarded, and move them last, so that they
    log what the stage's callbacks add to the logs (tokens_per_s)."""
    kinds = tuple(INTEGRATION_TO_CALLBACK.values())
    handler = trainer.callback_handler
    trackers = [Guarded(c) for c in handler.callbacks if isinstance(c, kinds)]
    handler.callbacks = [c for c in handler.callbacks if not isinstance(c, kinds)] + trackers
