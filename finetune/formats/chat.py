"""`chat`: conversations (OpenAI {role, content} or ShareGPT {from, value} messages) rendered with the recipe's
plain-text chat template (`data.chat`); assistant turns are the targets, each closed by EOS.

Record: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. With
`instruction_field` set (in `data.chat` or on one source of a mixture), rows are Alpaca-shaped instead: each is a
conversation of one user turn (the instruction, then the input after a blank line when there is one) and the
assistant's reply (the output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError
from finetune.formats.base import (EOS, DataFormat, Message, Segment, check_template, required_field,
                                   required_text)
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
    instruction_field: str | None = None  # set: rows are {instruction, input, output}, not messages
    input_field: str | None = None  # default "input" (for instruction-shaped rows)
    output_field: str | None = None  # default "output" (for instruction-shaped rows)
    system: str = "System: {content}\n\n"
    user: str = "User: {content}\n\n"
    assistant: str = "Assistant:"
    assistant_content: str = " {content}"
    after_assistant: str = "\n\n"
    system_prompt: str | None = None

    def check(self, where: str) -> None:
        for role in ("system", "user", "assistant_content"):  # `assistant`, `after_assistant` are used as written
            check_template(where, f"data.chat.{role}", getattr(self, role), ("content",), ("content",))
        if problem := self.shape_problem("data.chat"):
            raise UserError(f"{where}: {problem}")

    def shape_problem(self, key: str, given: tuple[str, ...] = ("messages_field", "input_field", "output_field")) \
            -> str | None:
        """Why these field names mix the two row shapes, naming a field of `given` as set under `key` (None when
        they don't)."""
        if self.instruction_field is None:
            for name in ("input_field", "output_field"):
                if name in given and getattr(self, name):
                    return (f"'{key}.{name}' names a field of instruction-shaped rows; set '{key}.instruction_field' "
                            "too (without it, rows are conversations)")
        elif "messages_field" in given and self.messages_field:
            return (f"'{key}.messages_field' and 'instruction_field' are both set: a row is a conversation or an "
                    "instruction, not both")
        return None


class Chat(DataFormat):
    name = "chat"
    card_example = "Hello! What can you do?"
    has_reference = True

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        if self.data.chat.instruction_field:
            return instruction_conversation(row, self.data.chat, where)
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


def instruction_conversation(row: dict, cfg: ChatFormat, where: Any) -> tuple[dict | None, str | None]:
    """An Alpaca-shaped row as a conversation: the instruction (and the input, after a blank line) from the user,
    the output from the assistant; dropped as `empty` without an instruction or an output."""
    instruction = required_text(row, cfg.instruction_field, where)
    response = required_text(row, cfg.output_field or "output", where)
    extra = row.get(cfg.input_field or "input")
    extra = "" if extra is None else str(extra)
    if not instruction.strip() or not response.strip():
        return None, "empty"
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}]}, None


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
