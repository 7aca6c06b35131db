"""Data formats: raw rows -> normalized records -> text segments, each segment a target or not.

A segment is `(text, is_target)`; `text=None` stands for the end-of-text token. Segments are tokenized one by
one and concatenated, so training and generation see exactly the same prompt tokens and no response marker
has to be searched for in the token stream.
"""

from __future__ import annotations

from typing import Any

from finetune.errors import UserError
from finetune.long_texts import TokenIds, encode_bounded
from finetune.recipe import ChatFormat, ClassificationFormat, DataConfig, InstructionFormat

Segment = tuple[str | None, bool]
EOS = None

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}

RECORD_COLUMNS = {
    "text": ("text",),
    "instruction": ("prompt", "response"),
    "chat": ("messages",),
    "classification": ("text", "label", "prompt"),
}


def label_names(cfg: ClassificationFormat) -> list[str]:
    """Label words in label-index order."""
    labels = cfg.labels
    if isinstance(labels, dict):
        return [str(v) for v in labels.values()]
    return [str(v) for v in labels or []]


def label_lookup(cfg: ClassificationFormat) -> dict[str, int]:
    """Raw label value (its key, its position in a list, or its word) -> the label's index."""
    names = label_names(cfg)
    keys = [str(k) for k in cfg.labels] if isinstance(cfg.labels, dict) else [str(i) for i in range(len(names))]
    return {**{name: i for i, name in enumerate(names)}, **{key: i for i, key in enumerate(keys)}}


def _field(row: dict, name: str, where: Any) -> Any:
    value = row.get(name)
    if value is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise UserError(f"{where}: missing field '{name}' (fields present: {present})")
    return value


def _text(row: dict, name: str, where: Any) -> str:
    """A text field: a string (a JSON object or number there is a mistake in the data, not text to train on)."""
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def normalize(row: dict, cfg: DataConfig, where: Any, labels: dict[str, int] | None = None
              ) -> tuple[dict | None, str | None]:
    """One raw row -> (record, None), or (None, reason) when the row is dropped. Raises UserError on bad rows.
    `labels` is `label_lookup(cfg.classification)`, built once by the caller for classification data."""
    fmt = cfg.format
    if fmt == "text":
        text = _text(row, cfg.text_field, where)
        return ({"text": text}, None) if text.strip() else (None, "empty")
    if fmt == "instruction":
        return _normalize_instruction(row, cfg.instruction, where)
    if fmt == "chat":
        return _normalize_chat(row, cfg.chat, where)
    return _normalize_classification(row, cfg.classification, where, labels or label_lookup(cfg.classification))


def _normalize_instruction(row: dict, cfg: InstructionFormat, where: Any) -> tuple[dict | None, str | None]:
    instruction = _text(row, cfg.instruction_field, where)
    response = _text(row, cfg.output_field, where)
    extra = row.get(cfg.input_field) if cfg.input_field else None
    extra = "" if extra is None else str(extra)
    if not instruction.strip() or not response.strip():
        return None, "empty"
    template = cfg.template if extra.strip() else cfg.template_no_input
    return {"prompt": template.format(instruction=instruction, input=extra), "response": response}, None


def _messages_field(row: dict, cfg: ChatFormat, where: Any) -> str:
    if cfg.messages_field:
        return cfg.messages_field
    for name in ("messages", "conversations"):
        if row.get(name) is not None:
            return name
    raise UserError(f"{where}: no 'messages' or 'conversations' field; set data.chat.messages_field")


def _normalize_chat(row: dict, cfg: ChatFormat, where: Any) -> tuple[dict | None, str | None]:
    turns = _field(row, _messages_field(row, cfg, where), where)
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
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no_assistant_turn"
    return {"messages": messages}, None


def _normalize_classification(row: dict, cfg: ClassificationFormat, where: Any, labels: dict[str, int]
                              ) -> tuple[dict | None, str | None]:
    text = _text(row, cfg.text_field, where)
    raw_label = _field(row, cfg.label_field, where)
    index = labels.get(str(raw_label).strip())
    if index is None:
        known = list(cfg.labels) if isinstance(cfg.labels, dict) else label_names(cfg)
        raise UserError(f"{where}: label {raw_label!r} is not in the label set {known}")
    if not text.strip():
        return None, "empty"
    return {"text": text, "label": index, "prompt": cfg.template.format(text=text)}, None


def segments(record: dict, cfg: DataConfig) -> list[Segment]:
    """The training segments of one normalized record."""
    fmt = cfg.format
    if fmt == "text":
        return [(record["text"], True), (EOS, True)]
    if fmt == "instruction":
        return [(record["prompt"], False), (record["response"], True), (EOS, True)]
    if fmt == "chat":
        return chat_segments(record["messages"], cfg.chat)
    cls = cfg.classification
    label = label_names(cls)[record["label"]]
    return [(record["prompt"], False), (cls.label_prefix + label, True)]


def chat_segments(messages: list[dict], cfg: ChatFormat, add_generation_prompt: bool = False) -> list[Segment]:
    """Render a conversation with the recipe's plain-text chat template; assistant turns are targets closed by EOS.
    The text between replies is one segment (the end of a turn, the next turns, the assistant prefix), so it is
    tokenized as a whole, as the exported chat template (finetune/chat_template.py) is by any engine."""
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


def prompt_segments(record: dict, cfg: DataConfig) -> list[Segment]:
    """What the model is given at generation time: the non-target prefix up to the first target."""
    if cfg.format == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return chat_segments(messages[:last], cfg.chat, add_generation_prompt=True)
    prefix = []
    for text, target in segments(record, cfg):
        if target:
            break
        prefix.append((text, target))
    return prefix


def encode_texts(tokenizer: Any, texts: list[str]) -> list[TokenIds]:
    """Token ids of plain texts, straight from the Rust tokenizer (no special tokens added, and special-token
    strings inside the data, such as a literal "<|endoftext|>", encoded as ordinary text)."""
    if not texts:
        return []
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return encode_bounded(backend, texts)
    finally:
        backend.encode_special_tokens = previous


def encode_segments(tokenizer: Any, batch: list[list[Segment]], ignore: int = -100) -> list[tuple[list[int], list[int]]]:
    """Tokenize many segment lists with one batched tokenizer call.

    Returns (token ids, labels) per segment list: labels repeat the ids on target segments, `ignore` elsewhere.
    """
    pieces = iter(encode_texts(tokenizer, [text for segs in batch for text, _ in segs if text is not None]))
    eos = [tokenizer.eos_token_id]
    out = []
    for segs in batch:
        ids: list[int] = []
        labels: list[int] = []
        for text, target in segs:
            piece = eos if text is None else next(pieces)
            ids += piece
            labels += piece if target else [ignore] * len(piece)
        out.append((ids, labels))
    return out
