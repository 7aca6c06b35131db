"""`instruction`: Alpaca-style {instruction, input, output} rows; the prompt template is not trained on, the
response and its closing EOS are. Record: {"prompt", "response"}."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.formats.base import EOS, DataFormat, Segment, check_template, required_text
from finetune.formats.jinja import CONTENT, fill, single_turn

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructionFormat:
    """`data.instruction`: the prompt templates and the row's field names."""
    template: str = ALPACA_TEMPLATE
    template_no_input: str = ALPACA_TEMPLATE_NO_INPUT
    instruction_field: str = "instruction"
    input_field: str | None = "input"
    output_field: str = "output"

    def check(self, where: str) -> None:
        for key in ("template", "template_no_input"):
            check_template(where, f"data.instruction.{key}", getattr(self, key), ("instruction", "input"),
                           ("instruction",))


class Instruction(DataFormat):
    name = "instruction"
    card_example = "Explain what a language model is in one sentence."
    has_reference = True

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        cfg = self.data.instruction
        instruction = required_text(row, cfg.instruction_field, where)
        response = required_text(row, cfg.output_field, where)
        extra = row.get(cfg.input_field) if cfg.input_field else None
        extra = "" if extra is None else str(extra)
        if not instruction.strip() or not response.strip():
            return None, "empty"
        template = cfg.template if extra.strip() else cfg.template_no_input
        return {"prompt": template.format(instruction=instruction, input=extra), "response": response}, None

    def segments(self, record: dict) -> list[Segment]:
        return [(record["prompt"], False), (record["response"], True), (EOS, True)]

    def reference(self, record: dict) -> str:
        return record["response"]

    def user_prompt(self, text: str) -> list[Segment]:
        return [(self.data.instruction.template_no_input.format(instruction=text, input=""), False)]

    def chat_template(self) -> str:
        prompt = fill(self.data.instruction.template_no_input, {"instruction": CONTENT, "input": ""})
        return single_turn(prompt, "{{ " + CONTENT + " }}{{ eos_token }}")
