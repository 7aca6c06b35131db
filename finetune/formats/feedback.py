"""`feedback`: single completions rated desirable or not (thumbs up / down), the unpaired data KTO trains on.
Three shapes are read:

- {prompt, completion, label}, the prompt a string (one user turn) or a list of messages;
- {messages | conversations, completion, label}: the conversation so far and the completion apart;
- {messages | conversations, label} whose last message is the assistant's: that message is the completion, the
  messages before it the prompt (LLaMA-Factory's KTO shape, as in kto_en_demo.json).

The label must be a boolean (true: desirable). The prompt is rendered with the recipe's chat template exactly as
preference prompts are; the completion is a target closed by EOS.

Record: {"prompt": [messages], "completion": text, "label": bool}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.fields import ranged
from finetune.formats.base import Segment
from finetune.formats.chat import Chat, chat_segments, parse_messages
from finetune.formats.preference import prompt_messages, response_segments, response_text


@dataclass
class FeedbackFormat:
    """`data.feedback`: the field names and the prompt's share of a sequence."""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    label_field: str = "label"
    messages_field: str | None = None  # the conversation shapes' field; default: `messages` or `conversations`
    max_prompt_tokens: int | None = ranged(None, 1)  # prompts cut from the left; default: half the block


class Feedback(Chat):
    name = "feedback"
    unpaired = True
    objectives = ("kto",)
    has_reference = False

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        cfg = self.data.feedback
        label = row.get(cfg.label_field)
        messages_field = cfg.messages_field or next((f for f in ("messages", "conversations") if f in row), None)
        completion = row.get(cfg.completion_field)
        if row.get(cfg.prompt_field) is not None:
            prompt = prompt_messages(row[cfg.prompt_field], f"{where}: field '{cfg.prompt_field}'")
        elif messages_field is not None and row.get(messages_field) is not None:
            prompt = parse_messages(row[messages_field], where)
            if completion is None and prompt and prompt[-1]["role"] == "assistant":
                prompt, completion = prompt[:-1], prompt[-1]["content"]
        else:
            return None, "missing_field"
        if completion is None or label is None:
            return None, "missing_field"
        if not isinstance(label, bool):
            return None, "label_not_boolean"
        completion = response_text(completion, f"{where}: field '{cfg.completion_field}'")
        if not completion.strip():
            return None, "empty_completion"
        return {"prompt": prompt, "completion": completion, "label": label}, None

    def prompt_segments(self, record: dict) -> list[Segment]:
        return chat_segments(record["prompt"], self.data.chat, add_generation_prompt=True)

    def completion_segments(self, record: dict) -> list[Segment]:
        return response_segments(self.data.chat, record["completion"])

    def segments(self, record: dict) -> list[Segment]:
        return self.prompt_segments(record) + self.completion_segments(record)
