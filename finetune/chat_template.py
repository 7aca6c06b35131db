"""The recipe's prompt format as the tokenizer's Jinja `chat_template`, saved in final/, merged/, hub/ and onnx/, so
that `tokenizer.apply_chat_template` (and the serving engines that use it) build the prompts the model was trained on.
Each format writes its own (its module in finetune/formats/; plain text has none).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.formats import data_format
from finetune.recipe import DataConfig


def chat_template(data: DataConfig) -> str | None:
    """The Jinja chat template that renders conversations exactly as `data`'s format did in training (None for
    plain text, which has no prompts)."""
    return data_format(data).chat_template()


def save_tokenizer(tokenizer: Any, data: DataConfig, folder: str | Path, portable: bool = False) -> None:
    """Save the tokenizer with the chat template of `data`'s format (a text run keeps the base's template). `portable`
    (for runtimes outside transformers 5: transformers.js, optimum's onnxruntime classes on transformers 4): the
    template inside tokenizer_config.json, the only place transformers.js reads, and a trained tokenizer's class
    named PreTrainedTokenizerFast, which transformers 4 knows (transformers 5 writes TokenizersBackend: the same
    tokenizer.json, the same ids), with GPT-2's inputs (else transformers 4 adds token_type_ids, which generate
    refuses)."""
    template = chat_template(data)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(folder, save_jinja_files=not portable)
    if portable:
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config_file.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast",
                                               "model_input_names": ["input_ids", "attention_mask"]}, indent=2))
