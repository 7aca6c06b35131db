"""`text`: plain documents, every token a target and EOS after each. Record: {"text"}.

No prompt template: `generate` continues the text as given, and `chat` talks through the recipe's chat template
(`data.chat`), which is not exported (the tokenizer keeps its own).
"""

from __future__ import annotations

from typing import Any

from finetune.formats.base import EOS, DataFormat, Message, Segment, required_text
from finetune.formats.chat import chat_segments, user_turn_stops


class Text(DataFormat):
    name = "text"
    card_example = "Once upon a time"
    every_token_target = True
    record_splits = ()

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        text = required_text(row, self.data.text_field, where)
        return ({"text": text}, None) if text.strip() else (None, "empty")

    def segments(self, record: dict) -> list[Segment]:
        return [(record["text"], True), (EOS, True)]

    def user_prompt(self, text: str) -> list[Segment]:
        return [(text, False)]

    def chat_prompt(self, messages: list[Message]) -> list[Segment]:
        return chat_segments(messages, self.data.chat, add_generation_prompt=True)

    def chat_stops(self) -> tuple[str, ...]:
        return user_turn_stops(self.data.chat)

    def chat_template(self) -> None:
        return None
