"""`finetune serve RECIPE`: an HTTP API (FastAPI + uvicorn) over one or more runs' models.

GET /health; POST /generate (the recipe's prompt template applied, like `finetune generate`); OpenAI-compatible
GET /v1/models, POST /v1/completions (the prompt as is) and POST /v1/chat/completions (the recipe's chat
template), both streaming as server-sent events with `"stream": true`. The request's `model` picks the run
(default: the recipe's own). Each model has a worker thread that decodes all waiting requests as one batch.

The parts: schemas (request bodies), worker (batching, tokenizing off the event loop, cancelling on hang-up), app
(routes), responses (OpenAI response shapes), errors (OpenAI error shapes, domain errors translated), auth (API
key), body_limit (request body size); this module loads the models and runs the server.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import uvicorn

from finetune.errors import UserError
from finetune.generation.loading import load_generator
from finetune.generation.params import SamplingParams
from finetune.recipe import Recipe, load_recipe
from finetune.serve.app import create_app
from finetune.serve.worker import ModelWorker


def load_workers(recipe: Recipe, base: bool = False, with_base: bool = False) -> list[ModelWorker]:
    """The recipe's model, then those of the recipes listed in `serve.extra_runs` (paths relative to the recipe):
    each run's final/ model, with `base` its bare base model (named NAME-base) instead, with `with_base` both."""
    recipes = [recipe]
    folder = Path(recipe.source).resolve().parent if recipe.source else Path.cwd()
    recipes += [load_recipe(folder / extra) for extra in recipe.serve.extra_runs]
    workers = []
    for r in recipes:
        for bare in (False, True) if with_base else (base,):
            worker = ModelWorker(load_generator(r, base=bare), SamplingParams.from_config(r.generate),
                                 recipe.serve.max_batch_size)
            if any(w.name == worker.name for w in workers):
                raise UserError(f"{recipe.source}: two served models are both named {worker.name!r}")
            workers.append(worker)
    return workers


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(recipe: Recipe, host: str | None = None, port: int | None = None, api_key: str | None = None,
          base: bool = False, with_base: bool = False) -> None:
    """Serve the run's model (and `serve.extra_runs`) until interrupted; unset arguments come from the recipe's
    `serve` section (the API key from the variable it names)."""
    cfg = recipe.serve
    host, port = host or cfg.host, cfg.port if port is None else port
    api_key = api_key or os.environ.get(cfg.api_key_env) or None
    check_port(host, port)
    workers = load_workers(recipe, base=base, with_base=with_base)
    app = create_app(workers, api_key, cfg)
    names = ", ".join(w.name for w in workers)
    print(f"serving {names} on http://{host}:{port} (OpenAI base_url http://{host}:{port}/v1; "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without an API key: anyone who can reach it can use the model",
              file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
