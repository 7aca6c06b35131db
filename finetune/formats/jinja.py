"""Pieces of the Jinja chat templates the formats export (finetune/chat_template.py saves them with the tokenizer).

Every literal of the recipe enters the Jinja source as a quoted string expression, so quotes, braces, `{%` and
newlines in a user's template are text, never Jinja.
"""

from __future__ import annotations

import json
import string

CONTENT = "message['content']"


def literal(text: str) -> str:
    """A Jinja expression printing `text` as is. Jinja reads string literals with Python's escapes, which JSON's
    are a subset of; non-ASCII characters are left as they are (Jinja escapes and decodes them itself)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def fill(template: str, values: dict[str, str]) -> str:
    """Jinja printing a str.format template (already validated: plain placeholders only) with each placeholder
    replaced by a Jinja expression from `values`."""
    out = []
    for text, name, _, _ in string.Formatter().parse(template):
        out.append(literal(text))
        if name is not None:
            out.append("{{ " + values[name] + " }}" if values[name] else "")
    return "".join(out)


def single_turn(prompt: str, reply: str) -> str:
    """Single-turn formats, as in `finetune chat` and `serve`: the last user message's prompt, then the reply to
    it (if the conversation has one)."""
    return ("{% set last = namespace(user=none, reply=none) %}"
            "{% for message in messages %}"
            "{% if message['role'] == 'user' %}{% set last.user = message %}{% set last.reply = none %}"
            "{% elif message['role'] == 'assistant' and last.user is not none %}{% set last.reply = message %}"
            "{% endif %}{% endfor %}"
            "{% if last.user is none %}{{ raise_exception('the conversation has no user message') }}{% endif %}"
            "{% set message = last.user %}" + prompt
            + "{% if last.reply is not none %}{% set message = last.reply %}" + reply + "{% endif %}")
