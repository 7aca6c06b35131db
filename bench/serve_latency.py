"""Serving benchmark: throughput and p50/p95 latency of /v1/completions for 1 and 16 concurrent clients.

A tiny random GPT-2 (2 layers, 32 wide, vocab 300, 128 positions, like the tests') is written as a finished run,
served by `python -m finetune serve` in its own process on 127.0.0.1, and driven by asyncio httpx clients from
this one; each request asks for --max-tokens sampled tokens. The 16-client case is also run with batching off
(serve.max_batch_size=1) for comparison.

    .venv/bin/python -m bench.serve_latency [--requests 96] [--max-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from bench.common import record  # noqa: E402
from finetune.tokenizer import train_tokenizer  # noqa: E402
from finetune.recipe import TokenizerTrainConfig, load_recipe, save_recipe  # noqa: E402

WORDS = "the a model server token batch request latency fast slow small tiny data text word line".split()


def tiny_run(folder: Path) -> Path:
    """A finished run (full model in final/) of a random tiny GPT-2; returns its recipe file."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    (folder / "train.txt").write_text("\n".join(corpus) + "\n")
    tokenizer = train_tokenizer(corpus, TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    base = folder / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump({"name": "bench-tiny", "output_dir": str(folder / "run"),
                                    "model": {"base": str(base)}, "data": {"train": str(folder / "train.txt")},
                                    "lora": None}))
    final = folder / "run" / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    save_recipe(load_recipe(path), final / "recipe.yaml")
    return path


async def drive(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent loops sending `requests` completions in all; latency per request, wall time overall."""
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient, jobs) -> None:
        nonlocal tokens
        for i in jobs:
            body = {"prompt": " ".join(WORDS[i % len(WORDS):][:3]), "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": i}
            start = time.perf_counter()
            reply = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            reply.raise_for_status()
            tokens += reply.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        warm_up = iter(range(2 * clients))
        await asyncio.gather(*(client(http, warm_up) for _ in range(clients)))
        latencies.clear()
        tokens = 0
        jobs = iter(range(requests))  # shared: each client takes the next request when its last one is done
        start = time.perf_counter()
        await asyncio.gather(*(client(http, jobs) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"requests_per_s": requests / wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(recipe: Path, threads: int, *overrides: str) -> tuple[subprocess.Popen, str]:
    """`finetune serve` in a child process; returns it once /health answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(recipe), *overrides, "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            httpx.get(f"{url}/health", timeout=1).raise_for_status()
            return server, url
        except httpx.HTTPError:
            if server.poll() is not None:
                raise RuntimeError("the server exited before answering") from None
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("the server did not answer within 2 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads (tiny models: 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = tiny_run(Path(tmp))
        print(f"tiny GPT-2 (2 layers, 32 wide), {args.requests} requests x {args.max_tokens} new tokens, "
              f"server torch threads {args.threads}")
        figures: dict = {"requests": args.requests, "max_tokens": args.max_tokens, "server_threads": args.threads}
        for case, clients, max_batch in (("c1", 1, 32), ("c16", 16, 32), ("c16_unbatched", 16, 1)):
            server, url = serve(recipe, args.threads, f"serve.max_batch_size={max_batch}")
            try:
                measured = asyncio.run(drive(url, clients, args.requests, args.max_tokens))
                stats = httpx.get(f"{url}/health").json()["models"]["bench-tiny"]
            finally:
                server.terminate()
                server.wait(timeout=30)
            measured["mean_batch"] = stats["mean_batch"]
            figures.update({f"{case}_{key}": round(value, 1) for key, value in measured.items()})
        figures["ratio_c16_batched_vs_unbatched_tokens_per_s"] = round(
            figures["c16_tokens_per_s"] / figures["c16_unbatched_tokens_per_s"], 2)
    record("serve_latency", figures)


if __name__ == "__main__":
    main()
