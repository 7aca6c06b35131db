"""A model ready to answer: its tokenizer, and prompts built with the template it was trained with, tokenized
segment by segment as in training and fitted into the context window."""

from __future__ import annotations

from collections.abc import Callable

import torch

from finetune.formats import Message, Segment, data_format, encode_segments
from finetune.generation.engine import Engine, Request
from finetune.generation.params import SamplingParams
from finetune.generation.window import PromptTooLong, fit_prompt, reply_reserve
from finetune.recipe import DataConfig


class Generator:
    """A loaded model with its tokenizer and the prompt format it was trained with."""

    def __init__(self, model: torch.nn.Module, tokenizer, data: DataConfig, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.data = data
        self.format = data_format(data)
        self.name = name
        self.engine = Engine(self.model, {tokenizer.eos_token_id}, self.decode)
        self.context = self.engine.context

    def encode(self, segments: list[Segment]) -> list[int]:
        ids = encode_segments(self.tokenizer, [segments])[0][0]
        return ids or [self.tokenizer.eos_token_id]  # GPT-2 convention: an empty prompt starts after <|endoftext|>

    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Prompt ids for one user text: the recipe's template applied (unless `raw`), tokenized as in training."""
        return self.encode([(text, False)] if raw else self.format.user_prompt(text))

    def chat_ids(self, messages: list[Message]) -> list[int]:
        """Prompt ids for a conversation, as the format prompts one (single-turn formats: the last user message)."""
        return self.encode(self.format.chat_prompt(messages))

    def chat_stops(self) -> tuple[str, ...]:
        return self.format.chat_stops()

    def fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep the end of a prompt that would not leave room for the reply."""
        return fit_prompt(ids, self.context, reply_reserve(self.context, max_new_tokens))

    def fit_chat(self, messages: list[Message], max_new_tokens: int) -> tuple[list[int], list[Message]]:
        """Drop the oldest turns (never a leading system message) until the prompt leaves room for the reply.
        Returns the prompt ids and the messages kept."""
        budget = self.context - reply_reserve(self.context, max_new_tokens)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        while True:
            ids = self.chat_ids(system + turns)
            if len(ids) <= budget:
                return ids, system + turns
            if len(turns) <= 1:
                raise PromptTooLong(f"the message is too long: {len(ids)} prompt tokens, but the context window of "
                                    f"{self.context} tokens leaves {budget} for the prompt")
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> Request:
        request = Request(prompt_ids, params, on_text=on_text)
        self.engine.run([request])
        return request

    def run(self, requests: list[Request]) -> None:
        """Generate all requests together, as one batch."""
        self.engine.run(requests)
