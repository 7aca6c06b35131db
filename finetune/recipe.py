"""Recipes: YAML files with `extends:` chains and dotted overrides, validated into typed objects.

Each key's rule lives on its field: its type, its choices (a `Literal`), its range (`ranged(...)`, in the field's
metadata); one generic pass enforces them while the recipe is built, and the checks that relate keys follow in
`_validate`. Loading imports transformers only when a recipe sets a key whose rule is one of transformers' own
tables: `model.init` (GPT2Config), `train.extra` (TrainingArguments) and a `train.scheduler` other than the
default (its schedules).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finetune.errors import UserError, path_problem
from finetune.fields import Bound, ranged
from finetune.formats import FORMATS, data_format
from finetune.formats.chat import ChatFormat
from finetune.formats.classification import ClassificationFormat
from finetune.formats.feedback import FeedbackFormat
from finetune.formats.instruction import InstructionFormat
from finetune.formats.preference import PreferenceFormat
from finetune.formats.prompt import PromptFormat
from finetune.rl.config import RewardSpec, RLConfig, check_rl, resolve_reward_paths
from finetune.run_folder import RunFolder
from finetune.sources import HubSource, LocalSource, SourceSpec, check_sources  # noqa: F401 - the source types
# are part of the recipe's types (importable from here)
from finetune.trackers import REPORTERS, check_installed

FormatName = Literal[tuple(FORMATS)]  # every registered data format


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = ranged(8192, 257)
    min_frequency: int = ranged(2, 1)


@dataclass
class TokenizerConfig:
    path: str | None = None
    train: TokenizerTrainConfig | None = None


@dataclass
class ModelConfig:
    base: str | None = None
    init: dict | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class DataConfig:
    train: SourceSpec = None  # one source or a list (finetune/sources.py)
    validation: SourceSpec = None
    format: FormatName = "text"
    text_field: str = "text"
    sample_by: Literal["line", "paragraph", "document"] = "line"
    block_size: int = ranged(256, 8)
    packing: bool = True
    overflow: Literal["truncate", "drop"] = "truncate"
    max_records: int | None = ranged(None, 1)
    validation_fraction: float = ranged(0.05, 0, 1, low_ok=False)
    seed: int = 42
    num_proc: int | None = ranged(None, 1)  # prepare worker processes; default: every core
    streaming: bool = False  # Hub data sets: read as a stream instead of downloading them whole first
    shard_tokens: int = ranged(1 << 24, 1)  # tokens per store shard: the unit a killed prepare resumes from
    instruction: InstructionFormat = field(default_factory=InstructionFormat)
    chat: ChatFormat = field(default_factory=ChatFormat)
    classification: ClassificationFormat = field(default_factory=ClassificationFormat)
    preference: PreferenceFormat = field(default_factory=PreferenceFormat)
    feedback: FeedbackFormat = field(default_factory=FeedbackFormat)
    prompt: PromptFormat = field(default_factory=PromptFormat)


@dataclass
class LoraConfig:
    r: int = ranged(8, 1)
    alpha: float = ranged(16, 0, low_ok=False)
    dropout: float = ranged(0.05, 0, 1)
    targets: Union[str, list] = "attn"
    modules_to_save: list | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


OBJECTIVES = tuple(dict.fromkeys(o for fmt in FORMATS.values() for o in fmt.objectives))  # train.objective: sft,
# dpo, ipo, simpo, reward (on preference pairs), kto (on feedback), grpo, rloo (on prompts); each data format lists
# those it trains with


@dataclass
class PreferenceConfig:
    """`train.preference`: the knobs of the preference objectives (defaults as TRL's)."""
    beta: float = ranged(0.1, 0, low_ok=False)  # dpo, simpo: reward scale; ipo: the regularisation tau
    label_smoothing: float = ranged(0.0, 0, 0.5)  # dpo: the assumed share of flipped labels (conservative DPO)
    simpo_gamma: float = ranged(0.5, 0)  # simpo: the target reward margin
    center_rewards_coefficient: float | None = ranged(None, 0)  # reward: weight of mean (r_c + r_r)^2 (TRL's knob)
    desirable_weight: float = ranged(1.0, 0, low_ok=False)  # kto: weight of the desirable completions' losses
    undesirable_weight: float = ranged(1.0, 0, low_ok=False)  # kto: weight of the undesirable completions' losses
    precompute_reference: bool = False  # dpo, ipo: reference log-probs computed once, cached; no reference in memory


@dataclass
class TrainConfig:
    """The Trainer's settings (finetune/train.py maps them onto TrainingArguments)."""
    epochs: float = ranged(1.0, 0)  # ignored when max_steps > 0
    max_steps: int = ranged(-1, -1)
    lr: float = ranged(2e-4, 0, low_ok=False)
    scheduler: str = "cosine"  # any transformers lr_scheduler_type: linear, cosine, constant, ...
    warmup_steps: int = ranged(0, 0)
    warmup_ratio: float = ranged(0.0, 0, 1)  # share of all steps; set this or warmup_steps
    batch_size: int = ranged(8, 1)  # per process; global batch = batch_size x grad_accum x processes
    eval_batch_size: int | None = ranged(None, 1)  # default: batch_size
    grad_accum: int = ranged(1, 1)
    weight_decay: float = ranged(0.0, 0)
    max_grad_norm: float = ranged(1.0, 0)  # 0 = no clipping
    logging_steps: int = ranged(10, 1)
    eval_steps: int | None = ranged(None, 0)  # None = at every save (the best checkpoint is kept and used); 0 = never
    save_steps: int = ranged(500, 1)  # must be a multiple of eval_steps
    save_total_limit: int | None = ranged(2, 1)  # the best checkpoint is kept on top
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    early_stopping_patience: int | None = ranged(None, 1)  # evaluations without improvement before stopping
    resume: str = "auto"  # auto (newest checkpoint of the run), never (start over), or a checkpoint path
    dataloader_workers: int = ranged(0, 0)
    loss_chunk: int | None = ranged(1024, 1)  # positions per chunk of the chunked loss; null = transformers' loss
    report_to: Union[str, list] = "tensorboard"  # a REPORTERS key or a list of them (finetune/tracking.py)
    run_name: str | None = None  # the run's name in the trackers; default: the recipe's name
    extra: dict = field(default_factory=dict)  # any other TrainingArguments argument, passed through
    objective: Literal[OBJECTIVES] = "sft"  # the data format decides which apply (_check_objective_data)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run by `finetune eval` (finetune/harness.py)."""
    tasks: list = field(default_factory=list)
    num_fewshot: int | None = ranged(None, 0)  # None: each task's own setting
    limit: Union[int, float, None] = ranged(None, 0, low_ok=False)  # examples per task (below 1: a share of them)
    include_path: str | None = None  # a folder of local task YAML files, relative to the recipe


@dataclass
class PolicySamplesConfig:
    """`eval.policy`: a preference policy (train.objective dpo, ipo, simpo, kto) sampled against its reference
    (finetune/policy_eval.py)."""
    prompts: int = ranged(16, 0, 1024, high_ok=True)  # held-out prompts, one completion each from both models; 0 = off
    max_new_tokens: int = ranged(64, 1, 1024, high_ok=True)


@dataclass
class EvalConfig:
    files: list = field(default_factory=list)
    stride: int | None = None
    batch_size: int = ranged(8, 1)
    max_examples: int | None = ranged(None, 1)
    baseline: bool = True
    shots: int = ranged(0, 0)
    calibrate: bool = False
    length_normalize: bool = False
    generate_samples: int = ranged(16, 0)
    max_new_tokens: int = ranged(128, 1)
    seed: int = 42
    harness: HarnessConfig | None = None
    policy: PolicySamplesConfig = field(default_factory=PolicySamplesConfig)
    rewards: list[RewardSpec] = field(default_factory=list)  # reward RL: held-out scorers (as rl.rewards)


@dataclass
class GenerateConfig:
    max_new_tokens: int = ranged(128, 1)
    temperature: float = ranged(0.8, 0, 2, high_ok=True)
    top_p: float = ranged(0.95, 0, 1, low_ok=False, high_ok=True)
    top_k: int = ranged(0, 0)
    repetition_penalty: float = ranged(1.0, 0, 10, low_ok=False, high_ok=True)
    stop: list = field(default_factory=list)
    seed: int | None = ranged(None, -(2**63), 2**64 - 1, high_ok=True)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = ranged(8000, 1, 65536)
    max_new_tokens_cap: int = ranged(512, 1)
    max_prompt_chars: int = ranged(100_000, 1)
    api_key_env: str = "FINETUNE_API_KEY"
    extra_runs: list = field(default_factory=list)
    max_batch_size: int = ranged(32, 1)


@dataclass
class Recipe:
    name: str = ""
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: str = field(default="", metadata={"internal": True})

    @property
    def run(self) -> RunFolder:
        """`output_dir` (made absolute when the recipe loads), or outputs/<name> under the working directory."""
        return RunFolder(Path(self.output_dir) if self.output_dir else Path.cwd() / "outputs" / self.name)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what `recipe.yaml` in the run folder holds)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, follow its `extends:` chain, apply `key.path=value` overrides and validate."""
    path = Path(path)
    raw = _load_chain(path.resolve(), [])
    for override in overrides:
        _apply_override(raw, override)
    recipe = _build(Recipe, raw, str(path))
    recipe.source = str(path)
    _validate(recipe, str(path))
    check_installed(recipe.train.report_to, str(path))
    return recipe


def recipe_from_dict(raw: dict, base_dir: str | Path = ".", where: str = "<recipe>") -> Recipe:
    """Build a recipe from already-merged data (as written to a run folder's `recipe.yaml`)."""
    raw = copy.deepcopy(raw)
    _resolve_paths(raw, Path(base_dir).resolve(), where)
    recipe = _build(Recipe, raw, where)
    recipe.source = where
    _validate(recipe, where)
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True))


def _read_yaml(path: Path) -> dict:
    if problem := path_problem(path):
        raise UserError(f"recipe file {path}: {problem}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise UserError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last one,
    which silently drops a whole section written twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(f"key '{key}' is given twice in one mapping, on line {first_line[key]} and on "
                                    f"line {line}: merge the two")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_chain(path: Path, seen: list[Path]) -> dict:
    if path in seen:
        chain = " -> ".join(str(p) for p in [*seen, path])
        raise UserError(f"recipe extends itself in a cycle: {chain}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    _resolve_paths(data, path.parent, str(path))
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: 'extends' must be a file path, got {parent!r}")
    base = _load_chain((path.parent / parent).resolve(), [*seen, path])
    return deep_merge(base, data)


def _resolve_paths(data: dict, folder: Path, where: str) -> None:
    """The one path rule: a path is relative to the recipe file that names it (`folder`; the working directory for
    command-line overrides), so paths are resolved in each file's data before merging. Data files, output_dir
    (after expanding ~ and $VAR), eval files and the harness's include_path always; model and tokenizer folders
    when written as ./ or ../ (anything else may be a Hub id)."""
    def section(*keys: str) -> dict:
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def resolved(value: object) -> object:
        return str((folder / value).resolve()) if isinstance(value, str) and not Path(value).is_absolute() else value

    def resolved_source(value: object) -> object:
        if isinstance(value, dict) and "path" in value:
            return {**value, "path": resolved(value["path"])}
        return resolved(value)

    for split in ("train", "validation"):
        if split in section("data"):
            value = data["data"][split]
            data["data"][split] = [resolved_source(v) for v in value] if isinstance(value, list) else \
                resolved_source(value)
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = resolved(expand_user_path(data["output_dir"], f"{where}: 'output_dir'"))
    for owner in ("rl", "eval"):
        if isinstance(section(owner).get("rewards"), list):
            data[owner]["rewards"] = resolve_reward_paths(data[owner]["rewards"], resolved)
    if isinstance(section("eval").get("files"), list):
        data["eval"]["files"] = [resolved(f) for f in data["eval"]["files"]]
    if section("eval", "harness").get("include_path") is not None:
        harness = section("eval", "harness")
        harness["include_path"] = resolved(harness["include_path"])
    for owner, key in (("model", "base"), ("tokenizer", "path")):
        value = section(owner).get(key)
        if isinstance(value, str) and value.startswith(("./", "../")):
            data[owner][key] = resolved(value)


def expand_user_path(value: str, where: str) -> str:
    """`~` and environment variables (`$VAR`, `${VAR}`) expanded; an unset variable is an error, not a folder name."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    if unset := re.search(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", expanded):
        raise UserError(f"{where} = {value!r}: environment variable {unset.group(0)} is not set")
    return expanded


def deep_merge(base: dict, child: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise UserError(f"override {override!r} must look like key.path=value")
    key_path, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override {override!r}: value is not valid YAML: {exc}") from None
    keys = key_path.strip().split(".")
    given: dict = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        given = {key: given}
    _resolve_paths(given, Path.cwd(), f"override {override!r}")
    node = raw
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = _leaf(given, keys)


def _leaf(data: dict, keys: list[str]) -> Any:
    for key in keys:
        data = data[key]
    return data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return "mapping"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "dict": "mapping", "list": "list"}.get(tp.__name__, tp.__name__)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")


def did_you_mean(value: Any, choices: Any, prefix: str = "", cutoff: float = 0.6) -> str:
    """"; did you mean 'PREFIX<closest choice>'?" when one is close to `value`, else ""."""
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1, cutoff=cutoff)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _fits_shape(option: Any, value: Any) -> bool:
    """Whether a union member is the one a value is written as: a list for a list type, and a mapping for the
    config type whose required keys it has (`{path: ...}` a LocalSource, `{hub: ...}` a HubSource)."""
    if isinstance(value, list):
        return typing.get_origin(option) is list
    if isinstance(value, dict) and dataclasses.is_dataclass(option):
        required = {f.name for f in dataclasses.fields(option)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return required <= value.keys()
    return False


def _build(tp: Any, value: Any, where: str, key: str = "") -> Any:
    """`value` (parsed YAML) as type `tp`, every field checked against its rule (type, choices, range)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}"
                            f"{did_you_mean(value, choices)}")
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        if len(shaped := [option for option in options if _fits_shape(option, value)]) == 1:
            return _build(shaped[0], value, where, key)  # its own error, not "must be of type A or B"
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, where, key)
            except UserError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"{where}: '{key}' must be of type {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{key or 'recipe'}' must be a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        kwargs = {}
        for name, item in value.items():
            full = f"{key}.{name}" if key else str(name)
            if name not in known:
                raise UserError(f"{where}: unknown key '{full}'"
                                f"{did_you_mean(name, known, f'{key}.' if key else '', cutoff=0.5)}")
            kwargs[name] = _build(hints[name], item, where, full)
            if "bound" in known[name].metadata:
                check_range(known[name].metadata["bound"], kwargs[name], f"{where}: '{full}'")
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise UserError(f"{where}: '{key or 'recipe'}' is missing a required key: {exc}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expected = origin or tp
    if expected is Any:
        return value
    if expected is list and typing.get_args(tp) and isinstance(value, list):
        return [_build(typing.get_args(tp)[0], item, where, f"{key}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError(f"{where}: '{key}' must be of type {_type_name(tp)}, got {value!r}")
    return value


def _check_report_to(recipe: Recipe, where: str) -> None:
    value = recipe.train.report_to
    names = [value] if isinstance(value, str) else value
    if not names:
        raise UserError(f"{where}: 'train.report_to' is an empty list; write none to turn tracking off")
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"{where}: 'train.report_to' entries must be strings, got {name!r}")
        if name not in REPORTERS:
            raise UserError(f"{where}: 'train.report_to' must be one of {', '.join(REPORTERS)}, got {name!r}"
                            f"{did_you_mean(name, REPORTERS)}")
    if "none" in names and len(names) > 1:
        raise UserError(f"{where}: 'train.report_to' lists none together with trackers: {names}")


MAX_STOPS, MAX_STOP_LENGTH = 16, 256  # generate.stop, --stop and the HTTP `stop`: up to 16 strings of 1-256 characters


def _field_bounds(tp: type, prefix: str = "") -> dict[str, Bound]:
    out = {}
    hints = typing.get_type_hints(tp)
    for item in dataclasses.fields(tp):
        key = f"{prefix}{item.name}"
        if "bound" in item.metadata:
            out[key] = item.metadata["bound"]
        for section in (typing.get_args(hints[item.name]) or (hints[item.name],)):
            if dataclasses.is_dataclass(section):
                out.update(_field_bounds(section, f"{key}."))
    return out


BOUNDS: dict[str, Bound] = _field_bounds(Recipe)  # dotted key -> the numbers it allows (from the fields)


def bound(key: str) -> Bound:
    return BOUNDS[key]


def check_bound(key: str, value: Any, name: str) -> None:
    """Raise a UserError naming `name` when `value` is outside the range of recipe key `key` (None passes)."""
    check_range(bound(key), value, name)


def check_range(limits: Bound, value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if not limits.contains(value):
        raise UserError(f"{name} must be {limits.allowed()}, got {value!r}")


def check_stops(stops: list, name: str) -> None:
    """Stop strings: at most MAX_STOPS, each a non-empty string of at most MAX_STOP_LENGTH characters."""
    if len(stops) > MAX_STOPS:
        raise UserError(f"{name} lists {len(stops)} stop strings; at most {MAX_STOPS} are allowed")
    for stop in stops:
        if not isinstance(stop, str) or not 1 <= len(stop) <= MAX_STOP_LENGTH:
            raise UserError(f"{name} must be non-empty strings of at most {MAX_STOP_LENGTH} characters, got {stop!r}")


def _check_templates(recipe: Recipe, where: str) -> None:
    data = recipe.data
    for section in (data.instruction, data.classification, data.chat):
        section.check(where)


def _check_harness(recipe: Recipe, where: str) -> None:
    cfg = recipe.eval.harness
    if cfg is None:
        return
    if not cfg.tasks or not all(isinstance(task, str) and task for task in cfg.tasks):
        raise UserError(f"{where}: 'eval.harness.tasks' must be a non-empty list of task names, got {cfg.tasks!r}")
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise UserError(f"{where}: 'eval.harness.include_path' = {cfg.include_path!r} is not a folder")


# train.* keys -> the TrainingArguments they set (finetune/train.py); train.extra passes any other one through.
TRAINING_ARGUMENTS = {
    "epochs": "num_train_epochs", "max_steps": "max_steps", "lr": "learning_rate", "scheduler": "lr_scheduler_type",
    "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "logging_steps": "logging_steps",
    "save_steps": "save_steps", "save_total_limit": "save_total_limit", "seed": "seed", "bf16": "bf16",
    "fp16": "fp16", "gradient_checkpointing": "activation_checkpointing",
    "dataloader_workers": "dataloader_num_workers",
    "report_to": "report_to", "run_name": "run_name",
}
# TrainingArguments the train stage derives from the recipe (train.extra may not set them).
STAGE_ARGUMENTS = ("output_dir", "warmup_steps", "per_device_eval_batch_size", "save_strategy", "eval_strategy",
                   "eval_steps", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
                   "include_num_input_tokens_seen", "remove_unused_columns", "run_name")
DEFAULT_DDP_TIMEOUT_S = 1800  # TrainingArguments.ddp_timeout's default


def _check_train(recipe: Recipe, where: str) -> None:
    cfg = recipe.train
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise UserError(f"{where}: 'train.max_steps' ({cfg.max_steps}) and 'train.epochs' ({cfg.epochs:g}) leave "
                        "nothing to train: set one of them above 0")
    if cfg.warmup_ratio and cfg.warmup_steps:
        raise UserError(f"{where}: set 'train.warmup_steps' or 'train.warmup_ratio', not both")
    if cfg.early_stopping_patience and cfg.eval_steps == 0:
        raise UserError(f"{where}: 'train.early_stopping_patience' needs evaluation: 'train.eval_steps' must not be 0")
    if cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
        raise UserError(f"{where}: 'train.save_steps' ({cfg.save_steps}) must be a multiple of 'train.eval_steps' "
                        f"({cfg.eval_steps}): the best checkpoint is chosen among the evaluated ones")
    timeout = cfg.extra.get("ddp_timeout", DEFAULT_DDP_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise UserError(f"{where}: 'train.extra.ddp_timeout' must be a whole number of seconds above 0; got "
                        f"{timeout!r}")
    if cfg.extra:
        _check_train_extra(cfg.extra, where)
    if cfg.scheduler != TrainConfig.scheduler:
        from transformers.trainer_utils import SchedulerType

        schedules = [schedule.value for schedule in SchedulerType]
        if cfg.scheduler not in schedules:
            raise UserError(f"{where}: 'train.scheduler' = {cfg.scheduler!r} is not a learning-rate schedule; use "
                            f"one of: {', '.join(schedules)}{did_you_mean(cfg.scheduler, schedules)}")
    _check_objective_data(recipe, where)
    if cfg.preference.precompute_reference and cfg.objective not in ("dpo", "ipo"):
        raise UserError(f"{where}: 'train.preference.precompute_reference' caches a reference model's "
                        f"log-probabilities of preference pairs, and train.objective {cfg.objective} has no "
                        "reference model or no pairs: remove it, or use dpo or ipo")
    if cfg.objective == "reward" and (recipe.eval.files or recipe.eval.harness):
        raise UserError(f"{where}: a reward model (train.objective: reward) scores sequences and has no next-token "
                        "distribution: 'eval.files' and 'eval.harness' do not apply to it; remove them")
    block = recipe.data.block_size
    fmt = data_format(recipe.data)
    if fmt.paired and (recipe.data.preference.max_prompt_tokens or 0) > block // 2:
        raise UserError(f"{where}: 'data.preference.max_prompt_tokens' must be at most half of data.block_size "
                        f"({block // 2}): a pair's two sequences share one row")
    if fmt.unpaired and (recipe.data.feedback.max_prompt_tokens or 0) > block:
        raise UserError(f"{where}: 'data.feedback.max_prompt_tokens' must be at most data.block_size ({block})")
    if cfg.objective == "kto" and cfg.batch_size < 2:
        raise UserError(f"{where}: 'train.batch_size' must be at least 2 with train.objective kto: its KL estimate "
                        "pairs each prompt with another example's completion from the same batch")


def _check_objective_data(recipe: Recipe, where: str) -> None:
    """The objective must be one its data format trains with (the format's `objectives`)."""
    objective, kind = recipe.train.objective, recipe.data.format
    fits = data_format(recipe.data).objectives
    if objective in fits:
        return
    needs = [name for name, fmt in FORMATS.items() if objective in fmt.objectives]
    raise UserError(f"{where}: 'train.objective' = {objective} does not train on data.format {kind}"
                    + (f" (it needs data.format: {needs[0]})" if len(needs) == 1 else "")
                    + f"; data.format {kind} trains with "
                    + (fits[0] if len(fits) == 1 else ", ".join(fits[:-1]) + " or " + fits[-1]))


def _check_train_extra(extra: dict, where: str) -> None:
    from transformers import TrainingArguments

    known = TrainingArguments.__dataclass_fields__
    for key in extra:
        owner = next((k for k, argument in TRAINING_ARGUMENTS.items() if argument == key), None)
        if key not in known:
            raise UserError(f"{where}: 'train.extra.{key}' is not a TrainingArguments argument"
                            f"{did_you_mean(key, known)}")
        if owner or key in STAGE_ARGUMENTS:
            hint = f"set 'train.{owner}' instead" if owner else "the train stage derives it from the recipe"
            raise UserError(f"{where}: 'train.extra.{key}' cannot be passed through: {hint}")


def _check_eval(recipe: Recipe, where: str) -> None:
    stride, block = recipe.eval.stride, recipe.data.block_size
    if stride is not None and not 1 <= stride <= block:
        raise UserError(f"{where}: 'eval.stride' must be between 1 and data.block_size ({block}), got {stride}")


def _check_generate_and_serve(recipe: Recipe, where: str) -> None:
    check_stops(recipe.generate.stop, f"{where}: 'generate.stop'")
    for extra in recipe.serve.extra_runs:
        if not isinstance(extra, str):
            raise UserError(f"{where}: 'serve.extra_runs' lists recipe files; got {extra!r}")


def _check_gpt2_config(init: dict, where: str) -> None:
    """`model.init` keys must be GPT-2 config keys (a typo would silently train another model), and the width
    must split into the heads."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import GPT2Config

    known = set(GPT2Config().to_dict())
    for key in init:
        if key not in known:
            raise UserError(f"{where}: 'model.init.{key}' is not a GPT-2 config key"
                            f"{did_you_mean(key, known, 'model.init.')}")
    try:
        config = GPT2Config(**init)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        raise UserError(f"{where}: 'model.init' is not a valid GPT-2 config: {exc}".splitlines()[0]) from None
    for key in ("n_layer", "n_head", "n_embd", "n_positions"):
        if not getattr(config, key) >= 1:
            raise UserError(f"{where}: 'model.init.{key}' must be at least 1, got {getattr(config, key)!r}")
    if config.n_embd % config.n_head:
        raise UserError(f"{where}: 'model.init.n_embd' ({config.n_embd}) must be a multiple of "
                        f"'model.init.n_head' ({config.n_head})")


def _validate(recipe: Recipe, where: str) -> None:
    if not recipe.name:
        raise UserError(f"{where}: 'name' is required (the run's name; outputs go to outputs/<name>/)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name):
        raise UserError(f"{where}: 'name' = {recipe.name!r} must be a plain folder name (letters, digits, '.', '_', "
                        "'-'; no '/' or '..'): the run goes to outputs/<name>/; set output_dir to put it elsewhere")
    root = recipe.run.root.resolve()
    if root in (Path(root.anchor), Path.home().resolve()):
        raise UserError(f"{where}: 'output_dir' = {recipe.output_dir!r} is {root}, the "
                        f"{'filesystem root' if root == Path(root.anchor) else 'home folder'} itself: name a folder "
                        "for the run, such as ~/runs/NAME")
    if bool(recipe.model.base) == bool(recipe.model.init is not None):
        raise UserError(f"{where}: set exactly one of 'model.base' (Hub id or folder) or 'model.init' (GPT-2 config)")
    check_sources(recipe.data, where)
    _check_templates(recipe, where)
    _check_report_to(recipe, where)
    _check_harness(recipe, where)
    _check_train(recipe, where)
    check_rl(recipe.rl, recipe.eval.rewards, recipe.train.objective, where)
    _check_eval(recipe, where)
    _check_generate_and_serve(recipe, where)
    if recipe.model.init is not None:
        _check_gpt2_config(recipe.model.init, where)
    data_format(recipe.data).check(where)
    if recipe.model.init is not None and recipe.tokenizer.path is None and recipe.tokenizer.train is None:
        raise UserError(f"{where}: a from-scratch model ('model.init') needs 'tokenizer.path' or 'tokenizer.train'")
    if recipe.tokenizer.path is not None and recipe.tokenizer.train is not None:
        raise UserError(f"{where}: set 'tokenizer.path' or 'tokenizer.train', not both")
