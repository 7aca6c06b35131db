from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import load_recipe, recipe_from_dict, save_recipe


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
    with pytest.raises(UserError, match="recipe file not found"):
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
    ("data.instruction.template='Q: {question}'", r"unknown placeholder\(s\) \{question\}; it may use \{instruction\}, \{input\}"),
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
    (["train.save_steps=10", "train.eval_steps=4"], r"'train.save_steps' \(10\) must be a multiple of 'train.eval_steps'"),
    (["train.extra.ddp_timeout=0"], r"'train.extra.ddp_timeout' must be a whole number of seconds above 0"),
    (["train.extra.optimm=adamw_torch"], r"'train.extra.optimm' is not a TrainingArguments argument; did you mean"),
    (["train.extra.learning_rate=0.1"], r"set 'train.lr' instead"),
    (["train.extra.output_dir=x"], r"the train stage derives it from the recipe"),
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
    with pytest.raises(UserError, match="'model.init.n_layers' is not a GPT-2 config key; did you mean 'model.init.n_layer'"):
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
