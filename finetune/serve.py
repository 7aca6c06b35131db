"""`finetune serve RECIPE`: an HTTP API (FastAPI + uvicorn) over one or more runs' models.

GET /health; POST /generate (the recipe's prompt template applied, like `finetune generate`); OpenAI-compatible
GET /v1/models, POST /v1/completions (the prompt as is) and POST /v1/chat/completions (the recipe's chat
template), both streaming as server-sent events with `"stream": true`. The request's `model` picks the run
(default: the recipe's own). Each model has a worker thread that decodes all waiting requests as one batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from finetune.errors import UserError
from finetune.generation.engine import Batch, Request
from finetune.generation.generator import Generator, Message
from finetune.generation.loading import load_generator
from finetune.generation.params import SamplingParams
from finetune.recipe import Recipe, check_bound, load_recipe

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CHOICES = 16
MAX_PROMPTS = 32
JOIN_RATIO = 0.3  # newcomers join a running batch once they are this fraction of it...
JOIN_AFTER_STEPS = 8  # ...or after this many decode steps


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """The OpenAI error shape, which the `openai` client turns into its typed exceptions."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ---------------------------------------------------------------- request bodies
def _encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can take: reject them as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}; "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(gt=0, le=10)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
StopText = Annotated[Text, Field(min_length=1, max_length=256)]
Stop = StopText | Annotated[list[StopText], Field(max_length=16)]
Count = Annotated[int, Field(ge=1)]


class Body(BaseModel):
    """Sampling fields shared by every endpoint; unset ones come from the recipe's `generate` section."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Penalty | None = None
    stop: Stop | None = None
    seed: Seed | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class OpenAIBody(Body):
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    max_tokens: Count | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _neutral_only(self) -> OpenAIBody:
        """Fields clients send with neutral values are accepted; real use of them is refused, not ignored."""
        for name, value in self.model_dump(exclude_unset=True).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ValueError(f"'{name}' = {value!r} is not supported by this server")
        return self


UNSUPPORTED = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
               "echo": (None, False), "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None, ""),
               "top_logprobs": (None, 0)}


class GenerateBody(Body):
    prompt: Text
    max_new_tokens: Count | None = None
    raw: bool = False


class CompletionBody(OpenAIBody):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def plain(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(OpenAIBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ---------------------------------------------------------------- batching
class ModelWorker:
    """One model's request queue, and the thread that decodes the waiting requests as one batch. Requests that
    arrive while a batch is running join it at the next step (continuous batching), up to max_batch_size rows."""

    def __init__(self, generator: Generator, defaults: SamplingParams, max_batch_size: int = 32,
                 gather_seconds: float = 0.002):
        self.generator = generator
        self.defaults = defaults
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds
        self.stats = {"requests": 0, "steps": 0, "largest_batch": 0, "mean_batch": 0.0}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.generator.name

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, requests: list[Request]) -> None:
        for request in requests:
            self._queue.put(request)

    def _take(self, room: int, wait: bool) -> list[Request] | None:
        """Up to `room` waiting requests; with `wait`, block for the first and gather briefly. None = stop."""
        taken: list[Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if wait and not taken:
                    item = self._queue.get()
                    deadline = time.monotonic() + self.gather_seconds
                elif deadline is not None:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return None
            taken.append(item)
        return taken

    def _admit(self, running: int, steps_waited: int) -> int:
        """How many waiting requests may join now. Each admission costs a prefill pass, so while a batch runs,
        newcomers join in groups (like TGI's waiting_served_ratio), or after a few steps at the latest."""
        room = self.max_batch_size - running
        waiting = self._queue.qsize()
        if not running or waiting >= max(1.0, JOIN_RATIO * running) or (waiting and steps_waited >= JOIN_AFTER_STEPS):
            return room
        return 0

    def _loop(self) -> None:
        batch = Batch(self.generator.engine)
        steps_waited = 0
        while (waiting := self._take(self._admit(len(batch.rows), steps_waited), wait=not batch.rows)) is not None:
            steps_waited = 0 if waiting else steps_waited + 1
            self.stats["requests"] += len(waiting)
            try:
                batch.add(waiting)
            except Exception as exc:  # noqa: BLE001 - report to the waiting clients instead of hanging them
                _fail(waiting, exc)
            if not batch.rows:
                continue
            steps = self.stats["steps"]
            self.stats["mean_batch"] = (self.stats["mean_batch"] * steps + len(batch.rows)) / (steps + 1)
            self.stats["steps"] = steps + 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
            try:
                batch.step()
            except Exception as exc:  # noqa: BLE001
                _fail(batch.rows, exc)
                batch = Batch(self.generator.engine)


def _fail(requests: list[Request], exc: Exception) -> None:
    for request in requests:
        if request.finish_reason is None:
            request.fail(f"{type(exc).__name__}: {exc}")


class Pending:
    """Requests handed to a worker; their text and completion arrive on the event loop as (index, text|None)."""

    def __init__(self, worker: ModelWorker, prompts: list[list[int]], params: list[SamplingParams], stream: bool):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        def push(item: tuple[int, str | None]) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the event loop closed (server shutting down)
                pass

        self.requests = [
            Request(ids, p, on_text=(lambda text, i=i: push((i, text))) if stream else None,
                    on_finish=lambda _, i=i: push((i, None)))
            for i, (ids, p) in enumerate(zip(prompts, params))
        ]
        worker.submit(self.requests)

    async def events_until_done(self) -> AsyncIterator[tuple[int, str | None]]:
        remaining = len(self.requests)
        try:
            while remaining:
                index, text = await self.events.get()
                if text is None and self.requests[index].finish_reason == "error":
                    raise ApiError(500, f"generation failed: {self.requests[index].error}", kind="server_error")
                remaining -= text is None
                yield index, text
        finally:
            self.cancel()

    async def results(self) -> list[Request]:
        async for _ in self.events_until_done():
            pass
        return self.requests

    def cancel(self) -> None:
        for request in self.requests:
            if request.finish_reason is None:
                request.cancelled = True


# ---------------------------------------------------------------- the app
class ApiKeyMiddleware:
    """401 for any request but /health without `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                          code="invalid_api_key", kind="authentication_error")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


UNION_FIELDS = {"prompt": f"a string or a list of 1 to {MAX_PROMPTS} strings",
                "stop": "a non-empty string or a list of up to 16 non-empty strings",
                "content": "a string or a list of text parts"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', 'decode error')}", None
    if errors and isinstance(errors[0].get("input"), bytes):
        return "the request body must be a JSON object sent with the header 'Content-Type: application/json'", None
    parts: dict[str, str] = {}
    for error in errors:
        loc = [str(x) for x in error["loc"] if x != "body"]
        message = error["msg"].removeprefix("Value error, ")
        union = next((i for i, part in enumerate(loc[:-1]) if part in UNION_FIELDS and not loc[i + 1].isdigit()), None)
        if union is not None:  # pydantic reports one error per member of the union: say what is expected instead
            where = ".".join(loc[:union + 1])
            parts[where] = f"{where}: must be {UNION_FIELDS[loc[union]]}"
        else:
            parts.setdefault(".".join(loc), f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(parts.values())), next(iter(parts)) or None


def create_app(workers: list[ModelWorker], api_key: str | None = None, max_new_tokens_cap: int = 512) -> FastAPI:
    """The HTTP app over already loaded models (the first one is the default `model`)."""
    by_name = {w.name: w for w in workers}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            worker.stop()

    app = FastAPI(title="gpt2-finetune", lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)

    def pick(name: str | None) -> ModelWorker:
        if name is None:
            return workers[0]
        if name not in by_name:
            raise ApiError(404, f"model {name!r} is not served here; models: {', '.join(by_name)}", "model",
                           "model_not_found", "not_found_error")
        return by_name[name]

    def fitted(worker: ModelWorker, build: Any, param: str) -> list[int]:
        try:
            ids = build()
        except UserError as exc:
            raise ApiError(400, str(exc), param) from None
        context = worker.generator.context
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, but model {worker.name!r} has a context window of "
                                f"{context} tokens, which must also hold at least one new token", param,
                           "context_length_exceeded")
        return ids

    def sampling(worker: ModelWorker, body: Body, max_tokens: int | None, extra_stops: tuple[str, ...] = (),
                 param: str = "max_tokens") -> SamplingParams:
        d = worker.defaults
        if max_tokens is not None and max_tokens > max_new_tokens_cap:
            raise ApiError(400, f"{param} = {max_tokens} is over this server's limit of {max_new_tokens_cap}", param)
        stop = [body.stop] if isinstance(body.stop, str) else (list(d.stop) if body.stop is None else body.stop)
        given = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                 "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "seed": body.seed}
        settings = {"max_new_tokens": min(d.max_new_tokens, max_new_tokens_cap),
                    **{k: v for k, v in given.items() if v is not None}}
        return replace(d, **settings, stop=tuple(dict.fromkeys([*stop, *extra_stops])))

    def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
        """n samples: seeds seed, seed+1, ... when seeded, so choice i equals a single request with seed+i."""
        if params.seed is None:
            return [params] * n
        return [replace(params, seed=params.seed + i) for i in range(n)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": {w.name: {"context_length": w.generator.context, **w.stats}
                                           for w in workers}}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": w.name, "object": "model", "created": created,
                                            "owned_by": "gpt2-finetune"} for w in workers]}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> dict:
        worker = pick(body.model)
        ids = fitted(worker, lambda: worker.generator.prompt_ids(body.prompt, raw=body.raw), "prompt")
        params = sampling(worker, body, body.max_new_tokens, param="max_new_tokens")
        (result,) = await Pending(worker, [ids], [params], stream=False).results()
        return {"text": result.text, "model": worker.name, "finish_reason": result.finish_reason,
                "prompt_tokens": len(ids), "completion_tokens": len(result.token_ids), "seed": result.seed}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        worker = pick(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) * body.n > MAX_PROMPTS * MAX_CHOICES // 4:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is too many completions for one request", "n")
        ids = [fitted(worker, lambda p=p: worker.generator.encode([(p, False)]), "prompt") for p in prompts]
        params = choices(sampling(worker, body, body.max_tokens), body.n)
        rows = [row for row in ids for _ in range(body.n)]
        pending = Pending(worker, rows, params * len(prompts), body.stream)
        reply = Reply(worker.name, "cmpl", "text_completion", sum(map(len, ids)))
        if body.stream:
            return sse(reply.completion_stream(pending, body.stream_options))
        return reply.completion(await pending.results())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        worker = pick(body.model)
        messages = [m.plain() for m in body.messages]
        ids = fitted(worker, lambda: worker.generator.chat_ids(messages), "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = choices(sampling(worker, body, max_tokens, worker.generator.chat_stops()), body.n)
        pending = Pending(worker, [ids] * body.n, params, body.stream)
        reply = Reply(worker.name, "chatcmpl", "chat.completion", len(ids))
        if body.stream:
            return sse(reply.chat_stream(pending, body.stream_options))
        return reply.chat(await pending.results())

    return app


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except ApiError as exc:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Reply:
    """OpenAI response objects for one request."""

    def __init__(self, model: str, prefix: str, kind: str, prompt_tokens: int):
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}
        self.prompt_tokens = prompt_tokens

    def usage(self, results: list[Request]) -> dict:
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def completion(self, results: list[Request]) -> dict:
        return {**self.head, "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                                          "logprobs": None} for i, r in enumerate(results)],
                "usage": self.usage(results)}

    def chat(self, results: list[Request]) -> dict:
        return {**self.head, "choices": [{"index": i, "message": {"role": "assistant", "content": r.text.strip()},
                                          "finish_reason": r.finish_reason, "logprobs": None}
                                         for i, r in enumerate(results)],
                "usage": self.usage(results)}

    async def completion_stream(self, pending: Pending, options: StreamOptions | None) -> AsyncIterator[dict]:
        head = {**self.head, "object": "text_completion"}
        async for index, text in pending.events_until_done():
            finish = pending.requests[index].finish_reason if text is None else None
            yield {**head, "choices": [{"index": index, "text": text or "", "finish_reason": finish,
                                        "logprobs": None}]}
        if options and options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(pending.requests)}

    async def chat_stream(self, pending: Pending, options: StreamOptions | None) -> AsyncIterator[dict]:
        head = {**self.head, "object": "chat.completion.chunk"}
        started: set[int] = set()
        for index in range(len(pending.requests)):
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        async for index, text in pending.events_until_done():
            if text is None:
                yield {**head, "choices": [{"index": index, "delta": {},
                                            "finish_reason": pending.requests[index].finish_reason}]}
                continue
            if index not in started:  # the template's space after "Assistant:" is not part of the answer
                text = text.lstrip()
                if not text:
                    continue
                started.add(index)
            yield {**head, "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}
        if options and options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(pending.requests)}


# ---------------------------------------------------------------- command line
def load_workers(recipe: Recipe, base: bool = False) -> list[ModelWorker]:
    """The recipe's model, then those of the recipes listed in `serve.extra_runs` (paths relative to the recipe)."""
    recipes = [recipe]
    folder = Path(recipe.source).resolve().parent if recipe.source else Path.cwd()
    for extra in recipe.serve.extra_runs:
        if not isinstance(extra, str):
            raise UserError(f"{recipe.source}: 'serve.extra_runs' lists recipe files; got {extra!r}")
        recipes.append(load_recipe(folder / extra))
    workers = []
    for r in recipes:
        defaults = SamplingParams.from_config(r.generate)
        if defaults.problem():
            raise UserError(f"{r.source}: generate.{defaults.problem()}")
        worker = ModelWorker(load_generator(r, base=base), defaults, recipe.serve.max_batch_size)
        if any(w.name == worker.name for w in workers):
            raise UserError(f"{recipe.source}: two served runs are both named {worker.name!r}")
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
          base: bool = False) -> None:
    """Serve the run's model (and `serve.extra_runs`) until interrupted; unset arguments come from the recipe's
    `serve` section (the API key from the variable it names)."""
    cfg = recipe.serve
    host, port = host or cfg.host, cfg.port if port is None else port
    check_bound("serve.port", port, "--port")
    api_key = api_key or os.environ.get(cfg.api_key_env) or None
    check_port(host, port)
    workers = load_workers(recipe, base=base)
    app = create_app(workers, api_key, cfg.max_new_tokens_cap)
    names = ", ".join(w.name for w in workers)
    print(f"serving {names} on http://{host}:{port} (OpenAI base_url http://{host}:{port}/v1; "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without an API key: anyone who can reach it can use the model",
              file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")


class BackgroundServer:
    """Run an app with uvicorn in a thread on a free port of 127.0.0.1 (tests, benchmarks): `with ... as url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
