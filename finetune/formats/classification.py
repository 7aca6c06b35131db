"""`classification`: {text, label} rows trained as the prompt template followed by the label's word; eval scores
every label word after each prompt. Record: {"text", "label" (the label's index), "prompt"}."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.formats.base import DataFormat, Segment, check_template, required_field, required_text
from finetune.formats.jinja import CONTENT, fill, literal, single_turn

if TYPE_CHECKING:
    from finetune.recipe import DataConfig


@dataclass
class ClassificationFormat:
    """`data.classification`: the row's field names, the label set and how a label follows the prompt."""
    text_field: str = "text"
    label_field: str = "label"
    labels: dict | list | None = None
    template: str = "{text}\nLabel:"
    label_prefix: str = " "

    def check(self, where: str) -> None:
        check_template(where, "data.classification.template", self.template, ("text",), ("text",))


class Classification(DataFormat):
    name = "classification"
    card_example = "A wonderful, moving film."
    record_splits = ("train", "validation")  # train records are eval's k-shot demonstrations

    def check(self, where: str) -> None:
        if not self.data.classification.labels:
            raise UserError(f"{where}: 'data.classification.labels' is required for the classification format "
                            "(label value -> words, e.g. {0: negative, 1: positive})")

    def __init__(self, data: DataConfig) -> None:
        super().__init__(data)
        labels = data.classification.labels
        self._names = [str(v) for v in (labels.values() if isinstance(labels, dict) else labels or [])]
        self._words = [data.classification.label_prefix + name for name in self._names]
        keys = [str(k) for k in labels] if isinstance(labels, dict) else [str(i) for i in range(len(self._names))]
        # a raw label value (its key, its position in a list, or its word) -> the label's index
        self._index = {**{name: i for i, name in enumerate(self._names)}, **{key: i for i, key in enumerate(keys)}}

    def label_names(self) -> list[str]:
        return self._names

    def label_words(self) -> list[str]:
        return self._words

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        cfg = self.data.classification
        text = required_text(row, cfg.text_field, where)
        raw_label = required_field(row, cfg.label_field, where)
        index = self._index.get(str(raw_label).strip())
        if index is None:
            known = list(cfg.labels) if isinstance(cfg.labels, dict) else self._names
            raise UserError(f"{where}: label {raw_label!r} is not in the label set {known}")
        if not text.strip():
            return None, "empty"
        return {"text": text, "label": index, "prompt": cfg.template.format(text=text)}, None

    def segments(self, record: dict) -> list[Segment]:
        return [(record["prompt"], False), (self._words[record["label"]], True)]

    def user_prompt(self, text: str) -> list[Segment]:
        return [(self.data.classification.template.format(text=text), False)]

    def chat_template(self) -> str:
        cfg = self.data.classification
        return single_turn(fill(cfg.template, {"text": CONTENT}), literal(cfg.label_prefix) + "{{ " + CONTENT + " }}")
