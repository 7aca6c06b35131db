"""`chat`: conversations (OpenAI {role, content} or ShareGPT {from, value} messages) rendered with the recipe's
plain-text chat template (`data.chat`); assistant turns are the targets, each closed by EOS.

Record: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError
from finetune.formats.base import EOS, DataFormat, Message, Segment, check_template, required_field
from finetune.formats.jinja import CONTENT, fill, literal

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}


@dataclass
class ChatFormat:
    """`data.chat`: the role templates (also used by text models in `finetune chat`)."""
    messages_field: str | None = None
    system: str = "System: {content}\n\n"
    user: str = "User: {content}\n\n"
    assistant: str = "Assistant:"
    assistant_content: str = " {content}"
    after_assistant: str = "\n\n"
    system_prompt: str | None = None

    def check(self, where: str) -> None:
        for role in ("system", "user", "assistant_content"):  # `assistant`, `after_assistant` are used as written
            check_template(where, f"data.chat.{role}", getattr(self, role), ("content",), ("content",))


class Chat(DataFormat):
    name = "chat"
    card_example = "Hello! What can you do?"
    has_reference = True

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        messages = parse_messages(required_field(row, self._messages_field(row, where), where), where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return None, "no_assistant_turn"
        return {"messages": messages}, None

    def _messages_field(self, row: dict, where: Any) -> str:
        if self.data.chat.messages_field:
            return self.data.chat.messages_field
        for name in ("messages", "conversations"):
            if row.get(name) is not None:
                return name
        raise UserError(f"{where}: no 'messages' or 'conversations' field; set data.chat.messages_field")

    def segments(self, record: dict) -> list[Segment]:
        return chat_segments(record["messages"], self.data.chat)

    def prompt_segments(self, record: dict) -> list[Segment]:
        """The conversation up to its last assistant turn, then the assistant prefix."""
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return chat_segments(messages[:last], self.data.chat, add_generation_prompt=True)

    def reference(self, record: dict) -> str:
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]

    def user_prompt(self, text: str) -> list[Segment]:
        return self.chat_prompt([{"role": "user", "content": text}])

    def chat_prompt(self, messages: list[Message]) -> list[Segment]:
        return chat_segments(messages, self.data.chat, add_generation_prompt=True)

    def chat_stops(self) -> tuple[str, ...]:
        return user_turn_stops(self.data.chat)

    def chat_template(self) -> str:
        return jinja_chat_template(self.data.chat)


def parse_messages(turns: Any, where: Any) -> list[Message]:
    """OpenAI {role, content} or ShareGPT {from, value} messages -> {role, content} with the standard roles."""
    if not isinstance(turns, list):
        raise UserError(f"{where}: chat messages must be a list, got {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: message {number} is not a mapping")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise UserError(f"{where}: message {number} needs 'role'/'content' (or ShareGPT 'from'/'value')")
        if str(role).lower() not in ROLE_ALIASES:
            raise UserError(f"{where}: message {number} has unknown role {role!r} "
                            f"(known: {', '.join(sorted(ROLE_ALIASES))})")
        messages.append({"role": ROLE_ALIASES[str(role).lower()], "content": str(content)})
    return messages


def chat_segments(messages: list[Message], cfg: ChatFormat, add_generation_prompt: bool = False) -> list[Segment]:
    """Render a conversation with the recipe's plain-text chat template; assistant turns are targets closed by EOS.
    The text between replies is one segment (the end of a turn, the next turns, the assistant prefix), so it is
    tokenized as a whole, as the exported chat template (`jinja_chat_template`) is by any engine."""
    out: list[Segment] = []
    if cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
        out.append((cfg.system.format(content=cfg.system_prompt), False))
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            out += [(cfg.assistant, False), (cfg.assistant_content.format(content=content), True), (EOS, True),
                    (cfg.after_assistant, False)]
        else:
            out.append((getattr(cfg, role).format(content=content), False))
    if add_generation_prompt:
        out.append((cfg.assistant, False))
    merged: list[Segment] = []
    for text, target in out:
        if merged and text is not None and merged[-1][0] is not None and merged[-1][1] == target:
            merged[-1] = (merged[-1][0] + text, target)
        elif text is None or text:
            merged.append((text, target))
    return merged


def user_turn_stops(cfg: ChatFormat) -> tuple[str, ...]:
    """Stop where the model starts writing the user's next turn (for models that never learned EOS)."""
    prefix = cfg.user.split("{content}")[0].strip()
    return (prefix,) if prefix else ()


def jinja_chat_template(cfg: ChatFormat) -> str:
    """Each message with its role's template, an assistant turn closed by EOS and `after_assistant`; the
    generation prompt is `assistant`."""
    turns = {role: fill(getattr(cfg, role), {"content": CONTENT}) for role in ("system", "user")}
    assistant = (literal(cfg.assistant) + fill(cfg.assistant_content, {"content": CONTENT}) + "{{ eos_token }}"
                 + literal(cfg.after_assistant))
    default_system = ""
    if cfg.system_prompt:
        default_system = ("{% if messages | length == 0 or messages[0]['role'] != 'system' %}"
                          + fill(cfg.system, {"content": json.dumps(cfg.system_prompt, ensure_ascii=False)})
                          + "{% endif %}")
    return (default_system
            + "{% for message in messages %}"
            + "{% if message['role'] == 'assistant' %}" + assistant
            + "{% elif message['role'] == 'user' %}" + turns["user"]
            + "{% elif message['role'] == 'system' %}" + turns["system"]
            + "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
            + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(cfg.assistant) + "{% endif %}")
