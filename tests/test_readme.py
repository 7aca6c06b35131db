"""The README's recipe reference tables agree with the config types: every key is documented, and every default
written as a value (a number, `a literal` or -) is the field's default. Descriptive defaults ("every core",
"= batch_size") are not compared."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
import yaml

from helpers import ROOT
from finetune.recipe import Recipe
from finetune.sources import HubSource, LocalSource, SourceOptions

SECTIONS = {name: typing.get_type_hints(Recipe)[name] for name in
            ("model", "tokenizer", "data", "lora", "train", "rl", "eval", "generate", "serve")}
NOT_DOCUMENTED_HERE = {"data.train", "data.validation"}  # documented, as one row; their keys in the `sources` table


def config_type(annotation: object) -> type | None:
    """The dataclass in an annotation such as `LoraConfig | None`, if any."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c) and not issubclass(c, SourceOptions)), None)


def fields(cls: type, prefix: str = "") -> dict[str, object]:
    """Every leaf key of a config type (nested ones dotted) -> its default."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        nested = config_type(hints[field.name])
        if nested is not None:
            out.update(fields(nested, f"{prefix}{field.name}."))
        elif field.default is not dataclasses.MISSING:
            out[prefix + field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[prefix + field.name] = field.default_factory()
        else:
            out[prefix + field.name] = None  # required: documented as -
    return out


def cells(text: str) -> list[str]:
    """A table cell's comma-separated items; commas inside `backticks` do not separate."""
    items, current, quoted = [], "", False
    for char in text:
        quoted ^= char == "`"
        if char == "," and not quoted:
            items.append(current)
            current = ""
        else:
            current += char
    return [item.strip() for item in [*items, current] if item.strip()]


def tables() -> dict[str, list[tuple[list[str], list[str]]]]:
    """Section -> rows of (keys, defaults) from the README's `section` reference tables."""
    found: dict[str, list] = {}
    section = None
    for line in (ROOT / "README.md").read_text().splitlines():
        heading = re.fullmatch(r"`(\w+)`( \(.*\))?", line.strip())
        if heading:
            section = heading.group(1)
        elif section in (*SECTIONS, "sources") and line.startswith("| `"):
            keys, defaults = line.split(" | ")[:2]
            keys = [k.strip("` ") for k in cells(keys.lstrip("| "))]
            prefix = keys[0].rpartition(".")[0]
            keys = [k if "." in k or not prefix else f"{prefix}.{k}" for k in keys]  # `a.b`, `c` = a.b, a.c
            found.setdefault(section, []).append((keys, cells(defaults)))
        elif not line.startswith("|") and found.get(section):
            section = None  # the table ended
    return found


def documented_default(cell: str, default: object) -> tuple[bool, object]:
    """(whether the README states a value, that value) for one default cell."""
    cell = re.sub(r"\s*\(.*\)$", "", cell)
    if cell == "-":
        return True, None
    if cell.startswith("`") and cell.endswith("`"):
        literal = cell[1:-1]
        if isinstance(default, str):
            return True, json.loads(literal) if literal.startswith('"') else literal.replace("\\n", "\n")
        return True, yaml.safe_load(literal)
    try:
        return True, float(cell)
    except ValueError:
        return False, None


README_TABLES = tables()


@pytest.mark.parametrize("section", SECTIONS)
def test_every_recipe_key_is_in_the_readme_with_its_default(section):
    documented: dict[str, str] = {}
    for keys, defaults in README_TABLES.get(section, []):
        if len(defaults) == 1:
            defaults = defaults * len(keys)
        assert len(defaults) == len(keys), f"README `{section}` row {keys}: {len(defaults)} defaults"
        documented.update(zip(keys, defaults))
    config = fields(config_type(SECTIONS[section]))
    missing = sorted(set(config) - set(documented) - {k.partition(".")[2] for k in NOT_DOCUMENTED_HERE
                                                          if k.startswith(section + ".")})
    assert not missing, f"README `{section}` table lacks {missing}"
    unknown = sorted(key for key in documented if key not in config and f"{section}.{key}" not in NOT_DOCUMENTED_HERE)
    assert not unknown, f"README `{section}` table documents keys the recipe does not have: {unknown}"
    for key, cell in documented.items():
        if key not in config:
            continue
        stated, value = documented_default(cell, config[key])
        if stated:
            assert value == config[key], f"README `{section}.{key}` default {cell} but the recipe's is {config[key]!r}"


def test_every_source_key_is_in_the_readme_with_its_default():
    """The `sources` table documents the keys of a data.train / data.validation entry, with their defaults."""
    documented: dict[str, str] = {}
    for keys, defaults in README_TABLES["sources"]:
        documented.update(zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults))
    config = {**fields(LocalSource), **fields(HubSource)}
    assert sorted(documented) == sorted(config)
    for key, cell in documented.items():
        stated, value = documented_default(cell, config[key])
        if stated:
            assert value == config[key], f"README `sources` {key} default {cell} but the type's is {config[key]!r}"
