"""`eval.harness`: EleutherAI lm-evaluation-harness tasks run in-process (its Python API) on the model `finetune eval`
has already loaded, tuned and base, so their figures sit beside ours in eval.json and report.md.

lm-eval is optional (`pip install -e ".[harness]"`). Tasks are harness task names or local task YAML files in
`eval.harness.include_path` (the shipped ones are in recipes/harness/); a task that cannot be loaded, offline
included, is a user error before any model is scored.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from finetune.errors import UserError
from finetune.recipe import HarnessConfig, Recipe

BOOTSTRAP_ITERS = 1000  # resamples for the standard errors the harness bootstraps (means get theirs analytically)


def check(recipe: Recipe) -> Any:
    """The harness's task manager for `eval.harness`, after loading every task once (data included): raises a
    UserError when lm-eval is missing or a task cannot be loaded."""
    cfg = recipe.eval.harness
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"{recipe.source}: 'eval.harness' needs lm-evaluation-harness, which is not installed: "
                        'pip install -e ".[harness]" (or pip install lm-eval)')
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=cfg.include_path, include_defaults=False) if cfg.include_path else None
    if manager is None or not set(cfg.tasks) <= set(manager.all_tasks):  # indexing the harness's own takes seconds
        manager = TaskManager(include_path=cfg.include_path)
    for task in cfg.tasks:
        try:
            manager.load([task])
        except Exception as exc:  # noqa: BLE001 - unknown name, bad YAML, data not reachable offline
            where = f" (include_path {cfg.include_path})" if cfg.include_path else ""
            raise UserError(f"{recipe.source}: 'eval.harness.tasks': {task!r} cannot be loaded{where}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return manager


@torch.inference_mode()
def evaluate(model: torch.nn.Module, tokenizer: Any, cfg: HarnessConfig, manager: Any, batch_size: int) -> dict:
    """Task -> {metric: value} (the harness's `metric,filter` keys, stderr included) for `model`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                             task_manager=manager, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
                             verbosity="ERROR")
    return {task: {key: value for key, value in figures.items() if key != "alias"}
            for task, figures in output["results"].items()}
