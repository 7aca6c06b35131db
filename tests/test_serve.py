"""The HTTP server, through the official `openai` client and raw HTTP, on a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers import WORDS, background_server, single_thread
from fastapi.testclient import TestClient

from finetune.cli import main
from finetune.generation.engine import Request
from finetune.generation.generator import Generator
from finetune.generation.params import SamplingParams
from finetune.recipe import ServeConfig, load_recipe
from finetune.serve import load_workers
from finetune.serve.app import create_app
from finetune.serve.body_limit import MAX_BODY_BYTES
from finetune.serve.worker import GenerationFailed, ModelWorker, Pending

KEY = "test-key-123"
CAP = 64


@pytest.fixture(scope="module")
def workers(finished_runs: dict[str, Path]) -> list[ModelWorker]:
    return load_workers(load_recipe(finished_runs["lora"]))


@pytest.fixture(scope="module")
def url(workers: list[ModelWorker]):
    app = create_app(workers, api_key=KEY, limits=ServeConfig(max_new_tokens_cap=CAP))
    with single_thread(), background_server(app) as address:
        yield address


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def models(workers: list[ModelWorker]) -> dict[str, Generator]:
    return {w.name: w.generator for w in workers}


def single(generator: Generator, ids: list[int], **settings) -> str:
    """What one request alone produces, without the server."""
    return generator.generate(ids, SamplingParams(**settings)).text


def test_models_and_health(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-lora", "tiny-full"]
    health = httpx.get(f"{url}/health").json()  # no key needed for health checks
    assert health["status"] == "ok" and health["models"]["tiny-lora"]["context_length"] == 128


def test_completions_plain_and_streaming(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny-lora", prompt="good", max_tokens=20, temperature=0)
    assert result.choices[0].text == " bad great awful"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens > 1
    chunks = list(client.completions.create(model="tiny-lora", prompt="pi rho", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    plain = client.completions.create(model="tiny-lora", prompt="pi rho", max_tokens=12, temperature=0)
    assert text == plain.choices[0].text and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completions_plain_and_streaming(client: openai.OpenAI, models: dict[str, Generator]) -> None:
    messages = [{"role": "system", "content": "recite"}, {"role": "user", "content": "alpha beta"}]
    result = client.chat.completions.create(model="tiny-full", messages=messages, max_tokens=16, temperature=0)
    generator = models["tiny-full"]
    expected = single(generator, generator.chat_ids(messages), max_new_tokens=16, temperature=0.0,
                      stop=generator.chat_stops())
    assert result.choices[0].message.content == expected.lstrip()
    assert result.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny-full", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.lstrip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_chat_reply_ending_in_whitespace_keeps_it_streamed_or_not(client: openai.OpenAI,
                                                                    models: dict[str, Generator]) -> None:
    """A reply cut by a stop string right after a space: streamed or not, it is the model's text without the
    template's leading space and with its trailing space (as OpenAI and vLLM return it)."""
    messages = [{"role": "user", "content": "good"}]
    settings = {"model": "tiny-full", "messages": messages, "temperature": 0, "max_tokens": 40, "stop": ["rho"]}
    plain = client.chat.completions.create(**settings).choices[0].message.content
    chunks = client.chat.completions.create(**settings, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    generator = models["tiny-full"]
    text = single(generator, generator.chat_ids(messages), max_new_tokens=40, temperature=0.0,
                  stop=(*generator.chat_stops(), "rho"))
    assert text.startswith(" ") and text.endswith(" ") and text.strip()
    assert plain == streamed == text.lstrip()


def test_generate_endpoint_applies_the_template_and_selects_the_model(url: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(f"{url}/generate", headers=headers, json={"prompt": "good", "temperature": 0,
                                                                  "model": "tiny-full"}).json()
    assert reply["text"] == " bad great awful" and reply["model"] == "tiny-full"
    assert reply["finish_reason"] == "stop" and reply["completion_tokens"] > 0
    cut = httpx.post(f"{url}/generate", headers=headers, json={"prompt": "good", "temperature": 0,
                                                                "stop": ["great"], "max_new_tokens": 8}).json()
    assert cut["text"] == " bad "


def test_n_choices_use_consecutive_seeds(client: openai.OpenAI, models: dict[str, Generator]) -> None:
    result = client.completions.create(model="tiny-lora", prompt="alpha", max_tokens=10, temperature=1.2, n=3,
                                       seed=40, top_p=1.0)
    generator = models["tiny-lora"]
    ids = generator.encode([("alpha", False)])
    assert [c.text for c in result.choices] == [
        single(generator, ids, max_new_tokens=10, temperature=1.2, top_p=1.0, seed=s) for s in (40, 41, 42)]


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": CAP + 1}, 400),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": "10"}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, 400),
    ("/v1/completions", {"prompt": 42}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "a", "top_k": -1}, 400),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400),
    ("/v1/completions", {"prompt": "a", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "a", "seed": "x"}, 400),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 1.0}, 400),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400),
    ("/v1/completions", {"prompt": "a", "max_tokenz": 5}, 400),
    ("/v1/completions", {"prompt": "alpha " * 200}, 400),
    ("/v1/completions", {"prompt": "a", "model": "no-such-model"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "alpha " * 200}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": []}, 400),
    ("/generate", {"prompt": "a", "max_new_tokens": -1}, 400),
    ("/generate", {"prompt": "a", "temperature": -1}, 400),
    ("/generate", {"prompt": None}, 400),
    ("/generate", {"prompt": "alpha " * 200}, 400),
    ("/generate", '{"prompt": "a",', 400),
    ("/generate", "[1, 2]", 400),
    ("/generate", '{"prompt": "\\ud800 x"}', 400),  # lone surrogates: valid JSON, not valid Unicode text
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', 400),
    ("/v1/completions", '{"prompt": "ok", "stop": "\\ud800"}', 400),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("/nowhere", {}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error(url: str, path: str, body, status: int) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else None
    response = httpx.post(f"{url}{path}", headers=headers, content=content, json=None if content else body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


def test_stream_options_without_streaming_are_refused(client: openai.OpenAI) -> None:
    """As OpenAI does: `stream_options` only goes with `"stream": true`; the error names the field."""
    chat = [{"role": "user", "content": "good"}]
    for create in (lambda **settings: client.completions.create(prompt="good", **settings),
                   lambda **settings: client.chat.completions.create(messages=chat, **settings)):
        with pytest.raises(openai.BadRequestError, match="only allowed when 'stream' is true") as refused:
            create(model="tiny-lora", max_tokens=2, stream_options={"include_usage": True})
        assert refused.value.param == "stream_options"
        with pytest.raises(openai.BadRequestError):
            create(model="tiny-lora", max_tokens=2, stream=False, stream_options={"include_usage": False})
        chunks = list(create(model="tiny-lora", max_tokens=2, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 2


def test_wrong_method_content_type_and_openai_client_errors(url: str, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/generate", headers=headers).status_code == 405
    form = httpx.post(f"{url}/generate", headers=headers, data={"prompt": "good"})  # curl -d without a JSON header
    assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model="tiny-lora", prompt="alpha " * 200)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")


def test_the_api_key_is_enforced(url: str) -> None:
    body = {"prompt": "good", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/completions", content=b"{", headers={"Content-Type": "application/json"}
                      ).status_code == 401  # checked before the body is read
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_without_a_key_nothing_is_required(workers: list[ModelWorker], url: str) -> None:
    plain = TestClient(create_app(workers))  # no lifespan: the workers are those the server at `url` started
    assert plain.get("/v1/models").status_code == 200
    assert plain.post("/generate", json={"prompt": "good", "temperature": 0}).json()["text"] == " bad great awful"


def test_32_concurrent_requests_get_their_own_outputs(url: str, models: dict[str, Generator]) -> None:
    jobs = []
    for i in range(32):
        model = "tiny-lora" if i % 2 else "tiny-full"
        settings = {"max_tokens": 8 + i % 5, "temperature": 0.0 if i % 4 == 0 else 0.9, "top_p": 0.9, "seed": i}
        prompt = " ".join(WORDS[i % len(WORDS):][:2])
        kind = ("completion", "chat", "generate")[i % 3]
        jobs.append((kind, model, prompt, settings))

    def expected(kind: str, model: str, prompt: str, settings: dict) -> str:
        g = models[model]
        params = {"max_new_tokens": settings["max_tokens"], "temperature": settings["temperature"],
                  "top_p": settings["top_p"], "seed": settings["seed"]}
        if kind == "completion":
            return single(g, g.encode([(prompt, False)]), **params)
        if kind == "chat":
            return single(g, g.chat_ids([{"role": "user", "content": prompt}]), stop=g.chat_stops(), **params).lstrip()
        return single(g, g.prompt_ids(prompt), **params)

    async def send(http: httpx.AsyncClient, kind: str, model: str, prompt: str, settings: dict) -> str:
        if kind == "completion":
            reply = await http.post("/v1/completions", json={"model": model, "prompt": prompt, **settings})
            return reply.json()["choices"][0]["text"]
        if kind == "chat":
            reply = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], **settings})
            return reply.json()["choices"][0]["message"]["content"]
        body = {"model": model, "prompt": prompt, "max_new_tokens": settings["max_tokens"],
                **{k: v for k, v in settings.items() if k != "max_tokens"}}
        return (await http.post("/generate", json=body)).json()["text"]

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            return await asyncio.gather(*(send(http, *job) for job in jobs))

    before = httpx.get(f"{url}/health").json()["models"]
    answers = asyncio.run(all_at_once())
    assert answers == [expected(*job) for job in jobs]
    after = httpx.get(f"{url}/health").json()["models"]
    assert sum(after[m]["requests"] - before[m]["requests"] for m in after) == 32
    assert max(after[m]["largest_batch"] for m in after) > 1  # the requests were decoded in batches


def test_serve_command_reports_a_busy_port(finished_runs: dict[str, Path], capsys) -> None:
    recipe = str(finished_runs["lora"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", recipe, "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_a_failed_generation_is_reported_and_the_worker_goes_on(workers: list[ModelWorker], url: str) -> None:
    async def out_of_vocabulary() -> None:  # a token id the embedding does not have: the prefill raises
        await Pending(workers[0], [[10**6]], [SamplingParams(max_new_tokens=2)], stream=False).results()

    with pytest.raises(GenerationFailed, match="generation failed: IndexError"):
        asyncio.run(out_of_vocabulary())
    reply = httpx.post(f"{url}/generate", headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "good", "temperature": 0})
    assert reply.json()["text"] == " bad great awful"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Until `condition` holds; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


def post_raw(address: str, path: str, body: dict) -> socket.socket:
    """A POST sent on a socket of its own, whose reply nobody reads; closing the socket hangs up."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def gated(generator: Generator, name: str) -> tuple[Generator, threading.Event]:
    """The same model, whose forward passes wait until the returned event is set."""
    copy = Generator(generator.model, generator.tokenizer, generator.data, name=name)
    gate = threading.Event()

    def forward(**inputs):
        gate.wait()
        return generator.model(**inputs)

    copy.engine.model = forward
    return copy, gate


CHAT = [{"role": "user", "content": "alpha"}]
HANGUPS = [("/generate", {"prompt": "alpha"}, 1),
           ("/v1/completions", {"prompt": "alpha", "n": 3}, 3),
           ("/v1/completions", {"prompt": ["alpha", "beta"], "stream": True}, 2),
           ("/v1/chat/completions", {"messages": CHAT, "n": 2}, 2),
           ("/v1/chat/completions", {"messages": CHAT, "stream": True, "n": 2}, 2)]


def test_requests_whose_client_hangs_up_leave_the_decoding_thread(models: dict[str, Generator]) -> None:
    """Requests of every endpoint, streamed or not, n > 1 too, whose clients hang up while they wait for the model
    (held at a gate until the clients are gone) are cancelled: the decoding thread drops their rows before they
    yield a token and takes no step for them beyond the one in flight, and the next request is answered."""
    model, gate = gated(models["tiny-full"], "gated")
    worker = ModelWorker(model, SamplingParams(max_new_tokens=CAP, temperature=1.0))
    submitted: list[Request] = []
    submit = worker.submit
    worker.submit = lambda requests: (submitted.extend(requests), submit(requests))  # watched, still submitted
    rows = 4 * sum(count for *_, count in HANGUPS)
    with background_server(create_app([worker])) as address:
        try:
            clients = [post_raw(address, path, body) for path, body, _ in HANGUPS * 4]
            wait_for(lambda: len(submitted) == rows, "every request to reach the decoding thread")
            for conn in clients:
                conn.close()
            wait_for(lambda: all(r.cancelled for r in submitted), "every hung-up request to be cancelled")
        finally:
            gate.set()
        reply = httpx.post(f"{address}/generate", json={"prompt": "good", "temperature": 0}, timeout=60).json()
        assert reply["text"] == " bad great awful"
    assert len(submitted) == rows + 1
    assert all(r.cancelled and not r.token_ids for r in submitted[:rows])
    assert worker.stats["steps"] <= 1 + reply["completion_tokens"] + 1  # the gated step, then the answer's steps


def test_health_answers_while_prompts_are_tokenized(models: dict[str, Generator]) -> None:
    """Prompts are tokenized off the event loop: while four large prompts are held mid-tokenization, /health
    answers; then each gets its own JSON error (too long for the context window)."""
    generator = models["tiny-full"]
    slow = Generator(generator.model, generator.tokenizer, generator.data, name="slow")
    entered, gate = threading.Event(), threading.Event()

    def held(segments):
        entered.set()
        gate.wait()
        return generator.encode(segments)

    slow.encode = held
    big = {"prompt": "alpha beta " * 9000}  # 99,000 characters: under serve.max_prompt_chars
    with background_server(create_app([ModelWorker(slow, SamplingParams())])) as address, ThreadPoolExecutor(4) as pool:
        replies = [pool.submit(httpx.post, f"{address}/v1/completions", json=big, timeout=60) for _ in range(4)]
        try:
            assert entered.wait(60)
            health = httpx.get(f"{address}/health", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "ok"
        finally:
            gate.set()
        errors = [reply.result().json()["error"] for reply in replies]
    assert [e["code"] for e in errors] == ["context_length_exceeded"] * 4


def test_too_large_bodies_and_prompts_get_openai_json_errors(url: str) -> None:
    """A body over the limit, with Content-Length or chunked, is a 413; a prompt over serve.max_prompt_chars is a
    400 naming the field, before tokenizing (one character less is tokenized, and is too long for the window)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"prompt": "a" * MAX_BODY_BYTES}).encode()
    declared = httpx.post(f"{url}/generate", headers=headers, content=body)
    chunked = httpx.post(f"{url}/generate", headers=headers,
                         content=(body[i:i + 65536] for i in range(0, len(body), 65536)))
    assert "content-length" not in chunked.request.headers
    for response in (declared, chunked):
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["message"] == f"the request body is over this server's limit of {MAX_BODY_BYTES} bytes"
    limit = ServeConfig.max_prompt_chars
    over = "alpha " * (limit // 6) + "x" * (limit % 6 + 1)
    halves = [{"role": "user", "content": over[:limit // 2]}, {"role": "user", "content": over[limit // 2:]}]
    for path, request, param in [("/generate", {"prompt": over}, "prompt"),
                                 ("/v1/completions", {"prompt": ["alpha", over]}, "prompt[1]"),
                                 ("/v1/chat/completions", {"messages": halves}, "messages")]:
        response = httpx.post(f"{url}{path}", headers=headers, json=request)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "string_above_max_length"), error
        assert error["message"] == f"{param}: {limit + 1} characters is over this server's limit of {limit}"
    at_limit = httpx.post(f"{url}/generate", headers=headers, json={"prompt": over[:-1]}).json()["error"]
    assert at_limit["code"] == "context_length_exceeded"


def test_a_failed_generation_is_a_500_json_error_or_an_error_event(models: dict[str, Generator]) -> None:
    generator = models["tiny-full"]
    broken = Generator(generator.model, generator.tokenizer, generator.data, name="broken")

    def fail(**_) -> None:
        raise RuntimeError("out of memory")

    broken.engine.model = fail
    with TestClient(create_app([ModelWorker(broken, SamplingParams())])) as http:  # starts the worker
        reply = http.post("/v1/completions", json={"prompt": "good"})
        assert reply.status_code == 500
        assert reply.json()["error"] == {"message": "generation failed: RuntimeError: out of memory",
                                         "type": "server_error", "param": None, "code": None}
        stream = http.post("/v1/completions", json={"prompt": "good", "stream": True})
        assert stream.status_code == 200 and '"type": "server_error"' in stream.text and "[DONE]" not in stream.text


@pytest.fixture(scope="module")
def api_schema(url: str):
    import schemathesis

    spec = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, request_timeout=60)
    return schema


def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_fit_the_schema(api_schema) -> None:
    """schemathesis generates bodies for every operation of the server's own OpenAPI schema: no response may be
    a server error or break the response schema it declares."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            case.validate_response(case.call(), checks=(not_a_server_error, response_schema_conformance))

        check()


def test_extreme_but_valid_sampling_settings_still_generate(url: str) -> None:
    """Found by the schema fuzz: a denormal temperature and repetition penalty overflowed the scores to NaN
    probabilities (a 500); they are accepted values, so they must generate."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "good", "temperature": 5e-324, "repetition_penalty": 5e-324, "top_p": 5e-324, "seed": 0,
            "max_new_tokens": 4}
    response = httpx.post(f"{url}/generate", headers=headers, json=body, timeout=60)
    assert response.status_code == 200, response.text
