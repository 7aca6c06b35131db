"""The recipe's prompt format as the tokenizer's Jinja `chat_template`, saved in final/, merged/ and hub/, so that
`tokenizer.apply_chat_template` (and the serving engines that use it) build the prompts the model was trained on.

Chat data renders each message with its role's template (`data.chat`), an assistant turn closed by EOS and
`after_assistant`, the generation prompt being `data.chat.assistant`. Instruction and classification models are
single-turn, as in `finetune chat` and `serve`: the last user message goes through the prompt template, followed by
the assistant's reply when there is one. Every literal of the recipe enters the Jinja source as a quoted string
expression, so quotes, braces, `{%` and newlines in a user's template are text, never Jinja.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from finetune.recipe import ChatFormat, DataConfig

CONTENT = "message['content']"


def _literal(text: str) -> str:
    """A Jinja expression printing `text` as is. Jinja reads string literals with Python's escapes, which JSON's
    are a subset of; non-ASCII characters are left as they are (Jinja escapes and decodes them itself)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fill(template: str, values: dict[str, str]) -> str:
    """Jinja printing a str.format template (already validated: plain placeholders only) with each placeholder
    replaced by a Jinja expression from `values`."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(_literal(literal))
        if name is not None:
            out.append("{{ " + values[name] + " }}" if values[name] else "")
    return "".join(out)


def _chat(cfg: ChatFormat) -> str:
    turns = {role: _fill(getattr(cfg, role), {"content": CONTENT}) for role in ("system", "user")}
    assistant = (_literal(cfg.assistant) + _fill(cfg.assistant_content, {"content": CONTENT}) + "{{ eos_token }}"
                 + _literal(cfg.after_assistant))
    default_system = ""
    if cfg.system_prompt:
        default_system = ("{% if messages | length == 0 or messages[0]['role'] != 'system' %}"
                          + _fill(cfg.system, {"content": json.dumps(cfg.system_prompt, ensure_ascii=False)})
                          + "{% endif %}")
    return (default_system
            + "{% for message in messages %}"
            + "{% if message['role'] == 'assistant' %}" + assistant
            + "{% elif message['role'] == 'user' %}" + turns["user"]
            + "{% elif message['role'] == 'system' %}" + turns["system"]
            + "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
            + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + _literal(cfg.assistant) + "{% endif %}")


def _single_turn(prompt: str, reply: str) -> str:
    """The last user message's prompt, then the reply to it (if the conversation has one)."""
    return ("{% set last = namespace(user=none, reply=none) %}"
            "{% for message in messages %}"
            "{% if message['role'] == 'user' %}{% set last.user = message %}{% set last.reply = none %}"
            "{% elif message['role'] == 'assistant' and last.user is not none %}{% set last.reply = message %}"
            "{% endif %}{% endfor %}"
            "{% if last.user is none %}{{ raise_exception('the conversation has no user message') }}{% endif %}"
            "{% set message = last.user %}" + prompt
            + "{% if last.reply is not none %}{% set message = last.reply %}" + reply + "{% endif %}")


def chat_template(data: DataConfig) -> str | None:
    """The Jinja chat template that renders conversations exactly as `data`'s format did in training (None for
    plain text, which has no prompts)."""
    if data.format == "chat":
        return _chat(data.chat)
    if data.format == "instruction":
        prompt = _fill(data.instruction.template_no_input, {"instruction": CONTENT, "input": ""})
        return _single_turn(prompt, "{{ " + CONTENT + " }}{{ eos_token }}")
    if data.format == "classification":
        cls = data.classification
        return _single_turn(_fill(cls.template, {"text": CONTENT}), _literal(cls.label_prefix) + "{{ " + CONTENT + " }}")
    return None


def save_tokenizer(tokenizer: Any, data: DataConfig, folder: str | Path) -> None:
    """Save the tokenizer with the chat template of `data`'s format (a text run keeps the base's template)."""
    template = chat_template(data)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
