"""The HTTP app over loaded models: GET / (the playground page, playground.html), GET /health, GET /v1/models,
POST /generate, POST /v1/completions and POST /v1/chat/completions. Each request's prompt is checked for size, built
off the event loop and checked against its model's context window, its sampling settings go over the model's
defaults, and its model's worker decodes it until it is done or its client hangs up."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from finetune.generation.params import SamplingParams
from finetune.generation.window import check_room
from finetune.recipe import ServeConfig
from finetune.serve.auth import ApiKeyMiddleware
from finetune.serve.body_limit import BodyLimit
from finetune.serve.errors import ApiError, add_error_handlers, invalid_input
from finetune.serve.responses import Reply, sse
from finetune.serve.schemas import MAX_CHOICES, MAX_PROMPTS, Body, ChatBody, CompletionBody, GenerateBody
from finetune.serve.worker import ModelWorker, Pending

# The page may run its own inline script and style and talk to this server, and load nothing from anywhere else.
PLAYGROUND_POLICY = ("default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                     "img-src data:; form-action 'none'; base-uri 'none'")


def pick(workers: list[ModelWorker], name: str | None) -> ModelWorker:
    """The model a request names (default: the first)."""
    if name is None:
        return workers[0]
    for worker in workers:
        if worker.name == name:
            return worker
    raise ApiError(404, f"model {name!r} is not served here; models: {', '.join(w.name for w in workers)}", "model",
                   "model_not_found", "not_found_error")


async def prompt_ids(worker: ModelWorker, build: Callable[[], list[int]], param: str, chars: int, limit: int
                     ) -> list[int]:
    """A request's prompt as `build` makes it, off the event loop; refused before that when its text has over `limit`
    characters, and after when it leaves no room in the model's context window."""
    if chars > limit:
        raise ApiError(400, f"{param}: {chars} characters is over this server's limit of {limit}", param,
                       "string_above_max_length")
    with invalid_input(param):
        ids = await worker.tokenize(build)
        check_room(len(ids), worker.generator.context, worker.name)
    return ids


async def hung_up(request: Request) -> None:
    """Returns when the client closes its connection (its body is read, so nothing else arrives before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def request_params(worker: ModelWorker, body: Body, max_tokens: int | None, cap: int, param: str = "max_tokens",
                   more_stops: tuple[str, ...] = ()) -> SamplingParams:
    """The model's defaults (at most `cap` new tokens) with the request's settings over them."""
    if max_tokens is not None and max_tokens > cap:
        raise ApiError(400, f"{param} = {max_tokens} is over this server's limit of {cap}", param)
    defaults = replace(worker.defaults, max_new_tokens=min(worker.defaults.max_new_tokens, cap))
    return defaults.merged({**body.sampling_settings(), "max_new_tokens": max_tokens}, more_stops)


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n samples: seeds seed, seed+1, ... when seeded, so choice i equals a single request with seed+i."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


def create_app(workers: list[ModelWorker], api_key: str | None = None, limits: ServeConfig | None = None
               ) -> FastAPI:
    """The HTTP app over already loaded models (the first one is the default `model`), with the request limits of
    a recipe's `serve` section."""
    created = int(time.time())
    limits = limits or ServeConfig()
    cap, chars = limits.max_new_tokens_cap, limits.max_prompt_chars

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            worker.stop()

    app = FastAPI(title="gpt2-finetune", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    add_error_handlers(app)
    page = resources.files("finetune.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PLAYGROUND_POLICY})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": {w.name: {"context_length": w.generator.context, **w.stats}
                                           for w in workers}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": w.name, "object": "model", "created": created,
                                            "owned_by": "gpt2-finetune"} for w in workers]}

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request) -> dict:
        worker = pick(workers, body.model)
        ids = await prompt_ids(worker, lambda: worker.generator.prompt_ids(body.prompt, raw=body.raw), "prompt",
                               len(body.prompt), chars)
        params = request_params(worker, body, body.max_new_tokens, cap, param="max_new_tokens")
        (result,) = await Pending(worker, [ids], [params], stream=False).results(hung_up(request))
        return {"text": result.text, "model": worker.name, "finish_reason": result.finish_reason,
                "prompt_tokens": len(ids), "completion_tokens": len(result.token_ids), "seed": result.seed}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        worker = pick(workers, body.model)
        prompts = {"prompt": body.prompt} if isinstance(body.prompt, str) else {
            f"prompt[{i}]": prompt for i, prompt in enumerate(body.prompt)}
        if len(prompts) * body.n > MAX_PROMPTS * MAX_CHOICES // 4:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is too many completions for one request", "n")
        ids = [await prompt_ids(worker, lambda p=p: worker.generator.encode([(p, False)]), param, len(p), chars)
               for param, p in prompts.items()]
        params = choices(request_params(worker, body, body.max_tokens, cap), body.n)
        rows = [row for row in ids for _ in range(body.n)]
        pending = Pending(worker, rows, params * len(prompts), body.stream)
        reply = Reply(worker.name, "cmpl", "text_completion", sum(map(len, ids)))
        if body.stream:
            return sse(reply.completion_stream(pending, body.stream_options))
        return reply.completion(await pending.results(hung_up(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        worker = pick(workers, body.model)
        messages = [m.plain() for m in body.messages]
        ids = await prompt_ids(worker, lambda: worker.generator.chat_ids(messages), "messages",
                               sum(len(m["content"]) for m in messages), chars)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = choices(request_params(worker, body, max_tokens, cap, more_stops=worker.generator.chat_stops()),
                         body.n)
        pending = Pending(worker, [ids] * body.n, params, body.stream)
        reply = Reply(worker.name, "chatcmpl", "chat.completion", len(ids))
        if body.stream:
            return sse(reply.chat_stream(pending, body.stream_options))
        return reply.chat(await pending.results(hung_up(request)))

    return app
