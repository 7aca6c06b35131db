"""`prompt`: prompts for reward RL (`train.objective: grpo | rloo`); the model writes the completions itself. The
prompt field holds a string, continued as written, or a list of chat messages (OpenAI or ShareGPT), rendered with
the recipe's chat template (`data.chat`) up to the assistant's turn. Every other field of the row is kept as a
column and reaches the reward functions (for example a reference answer). Nothing is a target: the store holds
the prompts' token ids, one per row; a prompt longer than `data.block_size` is dropped (`prompt_too_long`), since a
cut prompt would lose the end the completion continues.

Record: {"prompt": text or [messages], "columns": {field: value, ...}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError
from finetune.formats.base import Segment, required_field
from finetune.formats.chat import Chat, chat_segments, parse_messages
from finetune.rl.config import RL_OBJECTIVES


@dataclass
class PromptFormat:
    """`data.prompt`: the name of the prompt field."""
    prompt_field: str = "prompt"


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
