"""A GGUF file loaded in llama.cpp (through xllamacpp, its server compiled into a wheel): next-token log-probs,
greedy tokens, its tokenizer and its chat template, as llama.cpp itself computes them. The export checks use it,
and the GGUF bench."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import torch


class LlamaCpp:
    """One GGUF file loaded for one sequence at a time; `close` (or the `with` block's end) frees it."""

    def __init__(self, path: Path, context: int, threads: int | None = None) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or torch.get_num_threads()
        params.warmup = False
        params.use_jinja = True  # the chat template inside the file, rendered as llama-server renders it
        params.verbosity = -1
        try:
            self.server = xllamacpp.Server(params)
        except Exception as exc:  # noqa: BLE001 - llama.cpp's loader reports through a RuntimeError or ValueError
            raise RuntimeError(f"llama.cpp could not load {path}: {type(exc).__name__}: {exc}") from None
        self.address = self.server.listening_address
        with urllib.request.urlopen(self.address + "/props", timeout=60) as response:
            self.props = json.loads(response.read())
        self.eos = self.tokenize(self.props["eos_token"])[0]

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server = None

    def next_logprobs(self, ids: list[int], top: int) -> list[dict[str, Any]]:
        """The `top` most likely next tokens after the token ids `ids`, most likely first, as {"id", "logprob"}:
        log-probs over the whole vocabulary from llama.cpp's logits. (The one token it samples is forced to
        end-of-text, which does not touch those logits: the server drops the log-probs of a token that ends inside a
        UTF-8 character, which a byte-level model may well rank first.)"""
        reply = self.server.handle_completions({
            "prompt": ids, "n_predict": 1, "n_probs": top, "post_sampling_probs": False, "cache_prompt": True,
            "logit_bias": [[self.eos, 1e9]]})
        if "error" in reply or not reply["choices"][0]["logprobs"]:
            raise RuntimeError(f"llama.cpp gave no log-probs: {reply.get('error') or reply['choices'][0]}")
        return [{"id": entry["id"], "logprob": entry["logprob"]}
                for entry in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]

    def greedy(self, ids: list[int], max_tokens: int, top: int = 1) -> list[list[dict[str, Any]]]:
        """Greedy continuation of `ids`, through end-of-text too: per new token the `next_logprobs` it was the
        first of."""
        steps: list[list[dict[str, Any]]] = []
        for _ in range(max_tokens):
            steps.append(self.next_logprobs(ids + [step[0]["id"] for step in steps], top))
        return steps

    def generate(self, ids: list[int], max_tokens: int) -> dict[str, Any]:
        """llama-server's own greedy completion of `max_tokens` tokens (end-of-text ignored): its reply, with the
        server's timings."""
        return self.server.handle_completions({"prompt": ids, "n_predict": max_tokens, "temperature": 0.0,
                                               "ignore_eos": True, "cache_prompt": False})

    def tokenize(self, text: str) -> list[int]:
        """`text` in llama.cpp's tokenizer, special-token strings such as <|endoftext|> parsed as llama-server
        does for a chat prompt."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt the file's chat template renders for `messages` with the generation prompt."""
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def _post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(self.address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
