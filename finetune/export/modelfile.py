"""The Ollama Modelfile beside the GGUF files: the recipe's prompt format as an Ollama (Go text/template)
TEMPLATE, stopping at <|endoftext|> and where `finetune chat` stops. Ollama renders templates itself (it does not
run the file's Jinja chat template), hence this translation; Ollama is not run by the export or the tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

from finetune.errors import UserError
from finetune.formats import data_format
from finetune.formats.chat import jinja_chat_template
from finetune.recipe import DataConfig
from finetune.tokenizer import EOS_TOKEN

SENTINEL = "\x00prompt\x00"


def write_modelfile(path: Path, gguf_name: str, data: DataConfig) -> None:
    template = ollama_template(data)
    system = data.chat.system_prompt if chats_through_data_chat(data) else None
    if '"""' in template + (system or ""):
        raise UserError(f"data.{data.format}: the prompt template holds '\"\"\"', which an Ollama Modelfile cannot "
                        "quote")
    lines = [f"# ollama create MODEL_NAME -f {path.name}  (in this folder)", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in (EOS_TOKEN, *data_format(data).chat_stops())]
    path.write_text("\n".join(lines) + "\n")


def ollama_template(data: DataConfig) -> str:
    """Formats that chat through `data.chat` (chat, and preference, feedback and prompt data): each message
    through its role's template, then the assistant prefix. Other formats (single-turn): the user's prompt
    through the format's prompt template; plain text: the prompt as written."""
    fmt = data_format(data)
    if chats_through_data_chat(data):
        cfg = data.chat
        roles = {role: go_fill(getattr(cfg, role), "{{ .Content }}") for role in ("system", "user")}
        assistant = (go_text(cfg.assistant) + go_fill(cfg.assistant_content, "{{ .Content }}") + go_text(EOS_TOKEN)
                     + go_text(cfg.after_assistant))
        return ('{{ range .Messages }}{{ if eq .Role "system" }}' + roles["system"]
                + '{{ else if eq .Role "user" }}' + roles["user"]
                + '{{ else if eq .Role "assistant" }}' + assistant + "{{ end }}{{ end }}" + go_text(cfg.assistant))
    if fmt.chat_template() is None:
        return "{{ .Prompt }}"
    rendered = "".join(EOS_TOKEN if text is None else text for text, _ in fmt.user_prompt(SENTINEL))
    return "{{ .Prompt }}".join(go_text(part) for part in rendered.split(SENTINEL))


def chats_through_data_chat(data: DataConfig) -> bool:
    """Whether the file's chat template is `data.chat`'s (so that its role templates can be translated)."""
    return data_format(data).chat_template() == jinja_chat_template(data.chat)


def go_text(text: str) -> str:
    """`text` as literal Go template text: every "{" printed by an action, so none can start or join one."""
    return '{{ "{" }}'.join(text.split("{"))


def go_fill(template: str, content: str) -> str:
    """A str.format role template (placeholder `{content}` only, checked when the recipe loaded) as Go template."""
    out, text = [], ""
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is not None:
            out.append(go_text(text) + content)
            text = ""
    return "".join(out) + go_text(text)
