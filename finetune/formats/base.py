"""What a data format is: raw rows -> normalized records -> text segments, each segment a target or not.

A segment is `(text, is_target)`; `text=None` stands for the end-of-text token. Segments are tokenized one by
one and concatenated, so training and generation see exactly the same prompt tokens and no response marker
has to be searched for in the token stream.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, ClassVar

from finetune.errors import UserError

if TYPE_CHECKING:  # for annotations only: recipe.py imports the formats (their config sections, the registry)
    from finetune.recipe import DataConfig

Segment = tuple[str | None, bool]
Message = dict[str, str]
EOS = None


class DataFormat:
    """One value of `data.format`: how its rows become records, which part of a record is trained on, how the
    tuned model is prompted, and what eval compares it with. A subclass sets `name` and `card_example` and
    implements `normalize`, `segments`, `user_prompt` and `chat_template`; the other methods have the defaults
    of a single-turn prompted format."""

    name: ClassVar[str]
    card_example: ClassVar[str]  # the user text in the model card's usage snippet
    # Documents rather than examples: every token is a target (no mask is stored), and a document longer than a
    # row continues in the next one instead of being truncated.
    every_token_target: ClassVar[bool] = False
    record_splits: ClassVar[tuple[str, ...]] = ("validation",)  # splits whose records prepare keeps for eval
    has_reference: ClassVar[bool] = False  # eval compares greedy generations with each record's `reference`
    paired: ClassVar[bool] = False  # records are preference pairs, each stored as two sequences (see pair_segments)
    prompts_only: ClassVar[bool] = False  # records are prompts for reward RL: no targets, one prompt per row
    unpaired: ClassVar[bool] = False  # records are completions rated desirable or not, stored with their label (KTO)
    objectives: ClassVar[tuple[str, ...]] = ("sft",)  # the values of train.objective that train on this data

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def check(self, where: str) -> None:
        """The recipe checks that apply when this format is chosen (each config section checks its templates)."""

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        """One raw row -> (record, None), or (None, reason) when the row is dropped. Raises UserError on bad rows."""
        raise NotImplementedError

    def segments(self, record: dict) -> list[Segment]:
        """The training segments of one normalized record."""
        raise NotImplementedError

    def pair_segments(self, record: dict) -> tuple[list[Segment], list[Segment], list[Segment]]:
        """Paired formats: the prompt's segments and those of the chosen and the rejected response; prepare stores
        prompt + chosen and prompt + rejected as two adjacent sequences packed into one row."""
        raise NotImplementedError

    def prompt_segments(self, record: dict) -> list[Segment]:
        """What the model is given at generation time: the non-target prefix up to the first target."""
        prefix = []
        for text, target in self.segments(record):
            if target:
                break
            prefix.append((text, target))
        return prefix

    def user_prompt(self, text: str) -> list[Segment]:
        """The generation prompt for one user text (`generate`, the HTTP /generate), with the training template."""
        raise NotImplementedError

    def chat_prompt(self, messages: list[Message]) -> list[Segment]:
        """The generation prompt for a conversation (`chat`, /v1/chat/completions). Single-turn: the last user
        message through `user_prompt`."""
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        if last is None:
            raise UserError("the conversation has no user message")
        return self.user_prompt(last)

    def chat_stops(self) -> tuple[str, ...]:
        """Where a chat reply stops besides EOS (a single-turn model has no next turn to stop at)."""
        return ()

    def chat_template(self) -> str | None:
        """The Jinja chat template that renders conversations as this format did in training (None: it has no
        prompts, and the tokenizer keeps its own)."""
        raise NotImplementedError

    def reference(self, record: dict) -> str:
        """The reply eval compares a greedy generation for `record` with (formats with `has_reference`)."""
        raise NotImplementedError

    def label_names(self) -> list[str]:
        """Label names in label-index order, for formats that eval scores by label (none by default)."""
        return []

    def label_words(self) -> list[str]:
        """What follows the prompt for each label, in label-index order."""
        return []


def required_field(row: dict, name: str, where: Any) -> Any:
    value = row.get(name)
    if value is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise UserError(f"{where}: missing field '{name}' (fields present: {present})")
    return value


def required_text(row: dict, name: str, where: Any) -> str:
    """A text field: a string (a JSON object or number there is a mistake in the data, not text to train on)."""
    value = required_field(row, name, where)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def check_template(where: str, key: str, template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """A prompt template may use only its placeholders, must use the required ones (or the record's text would be
    silently left out), and has no stray braces ('{{' and '}}' stand for literal braces)."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise UserError(f"{where}: '{key}' is not a valid template ({exc}); write '{{{{' and '}}}}' for literal "
                        "braces") from None
    if any(spec or conversion for _, spec, conversion in parsed):
        raise UserError(f"{where}: '{key}' may use plain placeholders only ({{{allowed[0]}}}), without a format "
                        "spec or conversion such as ':>10' or '!r'")
    fields = {name for name, _, _ in parsed}
    unknown = sorted(fields - set(allowed))
    if unknown:
        raise UserError(f"{where}: '{key}' uses unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; "
                        f"it may use {', '.join('{' + a + '}' for a in allowed)}")
    missing = [f for f in required if f not in fields]
    if missing:
        raise UserError(f"{where}: '{key}' must contain {', '.join('{' + f + '}' for f in missing)}")
