"""`prompt`: prompts for reward RL (`train.objective: grpo | rloo`); the model writes the completions itself. The
prompt field holds a string, continued as written, or a list of chat messages (OpenAI or ShareGPT), rendered with
the recipe's chat template (`data.chat`) up to the assistant's turn. Every other field of the row is kept as a
column and reaches the reward functions (for example a reference answer). Nothing is a target: the store holds
the prompts' token ids, one per row; a prompt longer than `data.block_size` is dropped (`prompt_too_long`), since a
cut prompt would lose the end the completion continues. With `prefix_words`, a string prompt is first cut to its
opening words (the classic GPT-2 sentiment setting: continue the opening of an IMDb review).

Record: {"prompt": text or [messages], "columns": {field: value, ...}}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError
from finetune.fields import ranged
from finetune.formats.base import Segment, required_field
from finetune.formats.chat import Chat, chat_segments, parse_messages
from finetune.rl.config import RL_OBJECTIVES


@dataclass
class PromptFormat:
    """`data.prompt`: the name of the prompt field; `prefix_words`: keep only a string prompt's first N words."""
    prompt_field: str = "prompt"
    prefix_words: int | None = ranged(None, 1)


def opening_words(text: str, count: int) -> str:
    """The text up to the end of its `count`-th whitespace-separated word, its own spacing kept."""
    match = re.match(rf"\s*(?:\S+\s+){{{count - 1}}}\S+", text)
    return match.group(0) if match else text


class Prompt(Chat):
    name = "prompt"
    card_example = "Once upon a time"
    prompts_only = True
    objectives = RL_OBJECTIVES
    record_splits = ("train", "validation")  # training samples completions for the records' prompts
    has_reference = False

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        name = self.data.prompt.prompt_field
        value = required_field(row, name, where)
        prompt = value if isinstance(value, str) else parse_messages(value, f"{where}: field '{name}'")
        if not (prompt.strip() if isinstance(prompt, str) else any(m["content"].strip() for m in prompt)):
            return None, "empty"
        if isinstance(prompt, str) and self.data.prompt.prefix_words:
            prompt = opening_words(prompt, self.data.prompt.prefix_words)
        columns = {key: item for key, item in row.items() if key != name}
        try:
            json.dumps(columns)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: the row's other fields are passed to the reward functions and must be plain "
                            f"values (text, numbers, lists, mappings): {exc}") from None
        return {"prompt": prompt, "columns": columns}, None

    def segments(self, record: dict) -> list[Segment]:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [(prompt, False)]
        return [(text, False) for text, _ in chat_segments(prompt, self.data.chat, add_generation_prompt=True)]

    def prompt_segments(self, record: dict) -> list[Segment]:
        return self.segments(record)

    def user_prompt(self, text: str) -> list[Segment]:
        """A plain prompt is continued as written (a conversation goes through `chat_prompt`)."""
        return [(text, False)]
