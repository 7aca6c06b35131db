"""The recipe's prompt format as the tokenizer's Jinja `chat_template`, saved in final/, merged/ and hub/, so that
`tokenizer.apply_chat_template` (and the serving engines that use it) build the prompts the model was trained on.
Each format writes its own (its module in finetune/formats/; plain text has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.formats import data_format
from finetune.recipe import DataConfig


def chat_template(data: DataConfig) -> str | None:
    """The Jinja chat template that renders conversations exactly as `data`'s format did in training (None for
    plain text, which has no prompts)."""
    return data_format(data).chat_template()


def save_tokenizer(tokenizer: Any, data: DataConfig, folder: str | Path, template_in_config: bool = False) -> None:
    """Save the tokenizer with the chat template of `data`'s format (a text run keeps the base's template), in
    chat_template.jinja, or with `template_in_config` inside tokenizer_config.json (transformers.js reads only that)."""
    template = chat_template(data)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder, save_jinja_files=not template_in_config)
