import math
import re
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import (BOUNDS, Bound, GenerateConfig, Recipe, bound, load_recipe, recipe_from_dict,
                             save_recipe)


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"name": "base", "model": {"base": "gpt2"}, "data": {"train": "data/train.txt", "block_size": 64},
        "train": {"lr": 1e-3, "max_steps": 5}}


def test_extends_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "common" / "base.yaml", BASE)
    child = write(tmp_path / "child.yaml", {"extends": "common/base.yaml", "name": "child",
                                            "train": {"max_steps": 9}})
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.train.max_steps == 9 and recipe.train.lr == 1e-3
    # a data path is relative to the file that names it
    assert recipe.data.train == str((tmp_path / "common" / "data" / "train.txt").resolve())


def test_model_and_eval_paths_resolve_against_the_file_that_names_them(tmp_path):
    write(tmp_path / "common" / "base.yaml", BASE)
    child = write(tmp_path / "runs" / "child.yaml", {"extends": "../common/base.yaml",
                                                     "model": {"base": "../models/tiny"},
                                                     "eval": {"files": ["held-out.txt"]}})
    recipe = load_recipe(child)
    assert recipe.model.base == str((tmp_path / "models" / "tiny").resolve())
    assert recipe.eval.files == [str((tmp_path / "runs" / "held-out.txt").resolve())]
    assert load_recipe(child, ["model.base=gpt2-medium"]).model.base == "gpt2-medium"


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml", **BASE})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_are_typed_as_yaml(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    recipe = load_recipe(path, ["train.lr=3e-4", "lora=null", "data.block_size=128", "data.packing=false"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.lora is None
    assert recipe.data.block_size == 128 and recipe.data.packing is False


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path / "r.yaml", {**BASE, "train": {"learning_rte": 1}})
    with pytest.raises(UserError, match=r"r\.yaml.*unknown key 'train\.learning_rte'"):
        load_recipe(path)
    path = write(tmp_path / "r2.yaml", {**BASE, "data": {**BASE["data"], "blok_size": 3}})
    with pytest.raises(UserError, match="did you mean 'data.block_size'"):
        load_recipe(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match="'train.max_steps' must be of type integer"):
        load_recipe(path, ["train.max_steps=many"])
    with pytest.raises(UserError, match="'data.packing' must be of type boolean"):
        load_recipe(path, ["data.packing=3"])


def test_bad_choices_and_missing_keys(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match="'data.format' must be one of .*did you mean 'chat'"):
        load_recipe(path, ["data.format=chta"])
    with pytest.raises(UserError, match="exactly one of 'model.base'"):
        load_recipe(path, ["model.init={n_layer: 2}"])
    with pytest.raises(UserError, match="must end in one of"):
        load_recipe(path, ["data.train=notes.docx"])
    with pytest.raises(UserError, match="recipe file .*missing.yaml: not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", BASE))
    save_recipe(recipe, tmp_path / "resolved.yaml")
    again = recipe_from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again.to_dict() == recipe.to_dict()


def test_every_shipped_recipe_validates():
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "no shipped recipes found"
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.name, path


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", r"'train.lr' must be above 0, got -1.0"),
    ("train.batch_size=0", r"'train.batch_size' must be at least 1, got 0"),
    ("train.grad_accum=0", r"'train.grad_accum' must be at least 1"),
    ("train.save_steps=0", r"'train.save_steps' must be at least 1"),
    ("train.eval_batch_size=0", r"'train.eval_batch_size' must be at least 1"),
    ("train.max_grad_norm=-1", r"'train.max_grad_norm' must be at least 0"),
    ("train.dataloader_workers=-1", r"'train.dataloader_workers' must be at least 0"),
    ("train.loss_chunk=0", r"'train.loss_chunk' must be at least 1"),
    ("lora.r=0", r"'lora.r' must be at least 1"),
    ("lora.dropout=2.0", r"'lora.dropout' must be between 0 and 1, got 2.0"),
    ("data.shard_tokens=0", r"'data.shard_tokens' must be at least 1"),
    ("data.validation_fraction=1", r"'data.validation_fraction' must be between 0 and 1"),
    ("eval.shots=-1", r"'eval.shots' must be at least 0"),
    ("serve.port=99999", r"'serve.port' must be between 1 and 65536, got 99999"),
    ("data.instruction.template='Q: {question}'",
     r"unknown placeholder\(s\) \{question\}; it may use \{instruction\}, \{input\}"),
    ("data.instruction.template='Q: {instruction'", r"'data.instruction.template' is not a valid template"),
    ("data.classification.template='Review:\\nLabel:'", r"'data.classification.template' must contain \{text\}"),
    ("data.chat.user='User says'", r"'data.chat.user' must contain \{content\}"),
    ("name=../../elsewhere", r"'name' = '../../elsewhere' must be a plain folder name"),
])
def test_bad_values_templates_and_names_are_rejected_at_load_naming_the_key(tmp_path, override, message):
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match=message):
        load_recipe(path, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.warmup_steps=5", "train.warmup_ratio=0.1"], r"set 'train.warmup_steps' or 'train.warmup_ratio', not both"),
    (["train.early_stopping_patience=2", "train.eval_steps=0"], r"'train.eval_steps' must not be 0"),
    (["train.save_steps=10", "train.eval_steps=4"],
     r"'train.save_steps' \(10\) must be a multiple of 'train.eval_steps'"),
    (["train.extra.ddp_timeout=0"], r"'train.extra.ddp_timeout' must be a whole number of seconds above 0"),
    (["train.extra.optimm=adamw_torch"], r"'train.extra.optimm' is not a TrainingArguments argument; did you mean"),
    (["train.extra.learning_rate=0.1"], r"set 'train.lr' instead"),
    (["train.extra.output_dir=x"], r"the train stage derives it from the recipe"),
    (["lora.bias=bogus"], r"'lora.bias' must be one of none, all, lora_only, got 'bogus'"),
    (["eval.stride=0"], r"'eval.stride' must be between 1 and data.block_size \(64\), got 0"),
    (["eval.stride=65"], r"'eval.stride' must be between 1 and data.block_size \(64\), got 65"),
])
def test_train_and_eval_settings_that_need_no_model_are_checked_at_load(tmp_path, overrides, message):
    """So that `finetune train` refuses them before any work, not after training."""
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match=message):
        load_recipe(path, overrides)


def test_a_run_that_would_train_nothing_and_bad_scratch_configs_are_rejected(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match="leave nothing to train"):
        load_recipe(path, ["train.max_steps=0", "train.epochs=0"])
    scratch = ["model.base=null", "tokenizer.path=gpt2"]
    with pytest.raises(UserError,
                       match="'model.init.n_layers' is not a GPT-2 config key; did you mean 'model.init.n_layer'"):
        load_recipe(path, [*scratch, "model.init={n_layers: 2}"])
    with pytest.raises(UserError, match=r"'model.init.n_embd' \(30\) must be a multiple of 'model.init.n_head' \(4\)"):
        load_recipe(path, [*scratch, "model.init={n_embd: 30, n_head: 4}"])
    assert load_recipe(path, [*scratch, "model.init={n_embd: 32, n_head: 4}"]).model.init["n_embd"] == 32


def test_literal_braces_in_a_template_are_fine(tmp_path):
    path = write(tmp_path / "r.yaml", BASE)
    assert load_recipe(path, ["data.classification.template='{{literal}} {text}'"])


def test_a_recipe_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UserError, match=r"not valid UTF-8 at byte offset 9"):
        load_recipe(path)


def test_serve_port_from_the_command_line_shares_the_recipe_bound(tmp_path, capsys):
    from finetune.cli import main

    path = write(tmp_path / "r.yaml", BASE)
    assert main(["serve", str(path), "--port", "99999"]) == 2
    assert "--port must be between 1 and 65536, got 99999" in capsys.readouterr().err


SERVED_BOUNDS = [key for key in BOUNDS if key.startswith(("generate.", "serve."))]


def just_outside(limits: Bound) -> list:
    """The nearest whole numbers outside the bound (on each side that has a limit)."""
    values = [limits.low - 1 if limits.low_ok else limits.low]
    if limits.high is not None:
        values.append(limits.high + 1 if limits.high_ok else limits.high)
    return values


@pytest.mark.parametrize("key", SERVED_BOUNDS)
def test_generate_and_serve_bounds_are_checked_at_load_naming_the_key(tmp_path, key):
    path = write(tmp_path / "r.yaml", BASE)
    limits = bound(key)
    for value in just_outside(limits):
        with pytest.raises(UserError, match=re.escape(f"'{key}' must be {limits.allowed()}, got")):
            load_recipe(path, [f"{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("generate.stop=['']", "'generate.stop' must be non-empty strings of at most 256 characters, got ''"),
    ("generate.stop=[3]", "'generate.stop' must be non-empty strings of at most 256 characters, got 3"),
    (f"generate.stop=[{'x' * 257}]", "'generate.stop' must be non-empty strings of at most 256 characters"),
    (f"generate.stop=[{', '.join('abcdefghijklmnopq')}]", "'generate.stop' lists 17 stop strings; at most 16"),
    ("serve.extra_runs=[other.yaml, 7]", "'serve.extra_runs' lists recipe files; got 7"),
])
def test_stop_strings_and_extra_runs_are_checked_at_load(tmp_path, override, message):
    path = write(tmp_path / "r.yaml", BASE)
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(path, [override])
    assert load_recipe(path, [f"generate.stop=[{'x' * 256}, ab]"]).generate.stop == ["x" * 256, "ab"]


def test_train_refuses_a_bad_generate_setting_before_any_work(tmp_path, capsys):
    from finetune.cli import main

    path = write(tmp_path / "r.yaml", {**BASE, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(path), "generate.temperature=3"]) == 2
    assert "'generate.temperature' must be in [0, 2], got 3.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def command_line_accepts(*options: str) -> bool:
    from finetune.cli import build_parser
    from finetune.commands.sampling import sampling_params

    try:
        sampling_params(Recipe(), build_parser().parse_args(["generate", "r.yaml", "--prompt", "x", *options]))
    except UserError:
        return False
    return True


def http_accepts(**fields) -> bool:
    from pydantic import ValidationError

    from finetune.serve.schemas import GenerateBody

    try:
        GenerateBody.model_validate({"prompt": "x", **fields})
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"])
def test_the_command_line_and_the_http_api_allow_what_the_recipe_allows(name):
    """Around each edge of a generate.* bound, `--option` and the HTTP field accept exactly what the recipe key does."""
    limits = bound(f"generate.{name}")
    number = float if isinstance(getattr(GenerateConfig(), name), float) else int
    edges = [edge for edge in (limits.low, limits.high) if edge is not None]
    values = [number(edge + step) for edge in edges for step in (-1, 0, 1)]
    if number is float:
        values += [math.nextafter(edge, direction) for edge in edges for direction in (-math.inf, math.inf)]
    for value in values:
        command_line = command_line_accepts(f"--{name.replace('_', '-')}={value!r}")
        assert command_line == http_accepts(**{name: value}) == limits.contains(value), (name, value)


@pytest.mark.parametrize("stops, allowed", [([""], False), (["x" * 256], True), (["x" * 257], False),
                                            (list("abcdefghijklmnop"), True), (list("abcdefghijklmnopq"), False)])
def test_the_command_line_and_the_http_api_allow_the_same_stop_strings(stops, allowed):
    assert command_line_accepts(*(f"--stop={stop}" for stop in stops)) == http_accepts(stop=stops) == allowed


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\nmodel: {base: gpt2}\ntrain:\n  lr: 0.1\ndata: {train: a.txt}\n"
                    "train:\n  max_steps: 3\n")
    with pytest.raises(UserError, match=r"twice\.yaml: key 'train' is given twice in one mapping, on line 3 and on "
                                        r"line 6"):
        load_recipe(path)
    path.write_text("name: nested\nmodel: {base: gpt2}\ndata: {train: a.txt, block_size: 8, block_size: 16}\n")
    with pytest.raises(UserError, match="key 'block_size' is given twice in one mapping, on line 3 and on line 3"):
        load_recipe(path)


def test_output_dir_expands_home_and_variables_relative_to_the_file_that_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "common" / "base.yaml", {**BASE, "output_dir": "out/base"})
    child = write(tmp_path / "child.yaml", {"extends": "common/base.yaml"})
    assert load_recipe(child).run.root == tmp_path / "common" / "out" / "base"  # the parent's folder, not the cwd
    assert load_recipe(child, ["output_dir=~/runs/x"]).run.root == tmp_path / "home" / "runs" / "x"
    assert load_recipe(child, ["output_dir=$RUNS/x"]).run.root == tmp_path / "runs" / "x"
    assert load_recipe(child, ["output_dir=rel"]).run.root == tmp_path / "rel"  # an override: the working directory
    assert load_recipe(write(tmp_path / "plain.yaml", BASE)).run.root == tmp_path / "outputs" / "base"
    with pytest.raises(UserError, match=r"environment variable \$NOT_SET_HERE is not set"):
        load_recipe(child, ["output_dir=$NOT_SET_HERE/x"])
    for value, what in (("/", "the filesystem root"), ('"~"', "the home folder"), ("$HOME", "the home folder")):
        with pytest.raises(UserError, match=f"'output_dir' = .* is .*, {what} itself"):
            load_recipe(child, [f"output_dir={value}"])


LOAD_TIME_REFUSALS = [  # the recipe-value cases of the issue-10 probe, folded in: each refused at load, naming the key
    "train.lr=0", "train.lr=.nan", "train.lr=.inf", "train.lr=fast", "train.batch_size=-4", "train.batch_size=1.5",
    "train.max_steps=-5", "train.logging_steps=0", "train.warmup_steps=-1", "train.warmup_ratio=1.5",
    "train.weight_decay=-0.1", "train.save_total_limit=0", "train.early_stopping_patience=0", "train.eval_steps=-1",
    "lora.r=-2", "lora.alpha=0", "lora.dropout=-0.1", "model.dtype=float8", "model.attn_implementation=bogus",
    "data.block_size=0", "data.block_size=4", "data.validation_fraction=0", "data.validation_fraction=1.5",
    "data.max_records=0", "data.num_proc=0", "data.format=bogus", "data.sample_by=bogus", "data.overflow=bogus",
    "eval.batch_size=0", "eval.max_examples=0", "eval.max_new_tokens=0", "generate.max_new_tokens=0",
    "generate.temperature=-1", "generate.top_p=1.5", "generate.top_p=0", "generate.top_k=-1",
    "generate.repetition_penalty=0", "generate.stop=5", "serve.port=0", "serve.max_new_tokens_cap=0",
    "serve.max_batch_size=0", "tokenizer.path=null|tokenizer.train.vocab_size=100",
    "tokenizer.path=null|tokenizer.train.min_frequency=0",
]


@pytest.mark.parametrize("overrides", LOAD_TIME_REFUSALS)
def test_out_of_range_values_are_refused_at_load_naming_the_key(tmp_path, overrides):
    path = write(tmp_path / "r.yaml", BASE)
    overrides = overrides.split("|")
    key = overrides[-1].split("=")[0]
    with pytest.raises(UserError, match=re.escape(f"'{key}'")):
        load_recipe(path, overrides)
