"""Property tests over the recipe loader: any value of any type at any recipe key, and any from-scratch GPT-2
config, gives a valid recipe or a UserError naming the key, never another exception (a traceback). 300
examples each here; 3,000 each were run while writing them (they found that GPT2Config rejects a bool or None
n_layer with its own exception type, and that NaN passed the numeric bounds)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.errors import UserError
from finetune.recipe import Recipe, load_recipe

BASE = {"name": "prop", "model": {"base": "gpt2"}, "data": {"train": "train.txt", "block_size": 64}}


def key_paths(tp: type, prefix: str = "") -> list[str]:
    """Every key of the recipe schema, nested sections included."""
    out = []
    for field in dataclasses.fields(tp):
        if field.metadata.get("internal"):
            continue
        path = f"{prefix}{field.name}"
        out.append(path)
        hint = typing.get_type_hints(tp)[field.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] or \
            ([hint] if dataclasses.is_dataclass(hint) else [])
        for section in inner:
            out += key_paths(section, f"{path}.")
    return out


KEYS = key_paths(Recipe)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def with_value(key: str, value) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_at_any_key_is_a_recipe_or_a_user_error_naming_the_key(tmp_path: Path, key: str, value) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_value(key, value)))
    try:
        load_recipe(path)
    except UserError as exc:
        assert key.split(".")[0] in str(exc) or "extends" in str(exc), (key, value, str(exc))


GPT2_KEYS = ["n_layer", "n_head", "n_embd", "n_positions", "resid_pdrop", "activation_function", "layer_norm_epsilon"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(init=st.dictionaries(st.sampled_from(GPT2_KEYS), values, max_size=4))
def test_any_from_scratch_config_is_a_recipe_or_a_user_error_naming_it(tmp_path: Path, init: dict) -> None:
    raw = {**BASE, "model": {"init": init}, "tokenizer": {"path": "gpt2"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        load_recipe(path)
    except UserError as exc:
        assert "model.init" in str(exc), (init, str(exc))
