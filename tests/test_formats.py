"""The data formats on their own: a prompted format prompts generation exactly as its training examples begin, and
the rest of the pipeline asks the format object instead of switching on its name."""

from __future__ import annotations

import ast
from pathlib import Path

import finetune
from finetune.formats import FORMATS, data_format
from finetune.formats.classification import ClassificationFormat
from finetune.recipe import DataConfig

USER_TEXT = "alpha beta"
ROWS = {  # per prompted format, a raw row whose user text is USER_TEXT
    "instruction": {"instruction": USER_TEXT, "output": "gamma"},
    "chat": {"messages": [{"role": "user", "content": USER_TEXT}, {"role": "assistant", "content": "gamma"}]},
    "classification": {"text": USER_TEXT, "label": "1"},
    "preference": {"prompt": USER_TEXT, "chosen": "gamma", "rejected": "delta"},
    "feedback": {"prompt": USER_TEXT, "completion": "gamma", "label": False},
}


def test_a_prompted_format_prompts_generation_as_its_training_examples_begin():
    assert set(ROWS) == {name for name, fmt in FORMATS.items() if not (fmt.every_token_target or fmt.prompts_only)}
    for name, row in ROWS.items():
        fmt = data_format(DataConfig(format=name, classification=ClassificationFormat(labels=["bad", "good"])))
        record, reason = fmt.normalize(row, "row 1")
        assert reason is None, name
        segments = fmt.segments(record)
        prompt = fmt.user_prompt(USER_TEXT)
        assert prompt == fmt.prompt_segments(record) == segments[:len(prompt)], name
        assert not any(target for _, target in prompt) and segments[len(prompt)][1], name
        assert fmt.chat_prompt([{"role": "user", "content": USER_TEXT}]) == prompt, name


def _format_switches(path: Path) -> list[str]:
    """Comparisons of `<x>.format` or `fmt` with a format's name, as `file:line`."""
    switches = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = [c for operand in operands for c in ast.walk(operand) if isinstance(c, ast.Constant)
                 and c.value in FORMATS]
        subjects = [o for o in operands if isinstance(o, ast.Attribute) and o.attr == "format"
                    or isinstance(o, ast.Name) and o.id == "fmt"]
        if names and subjects:
            switches.append(f"{path.name}:{node.lineno}")
    return switches


def test_no_module_outside_formats_switches_on_a_format_name():
    package = Path(finetune.__file__).parent
    modules = [path for path in package.rglob("*.py") if "formats" not in path.relative_to(package).parts]
    assert len(modules) > 40
    assert [switch for path in modules for switch in _format_switches(path)] == []
