"""merge and push: merged logits equal the adapter's; the upload folder loads back, its card parses, its usage
snippet runs; the upload goes through huggingface_hub's HfApi calls (the Hub itself is unreachable here)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from helpers import RECITAL, subprocess_env
from preference_pairs import separable_pairs, write_run
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.cli import main
from finetune.collate import PairCollator
from finetune.errors import UserError
from finetune.eval_results import weight_files_digest
from finetune.hub import push
from finetune.formats import data_format, encode_segments
from finetune.model_card import model_card
from finetune.modeling import load_final
from finetune.recipe import Recipe, load_recipe
from finetune.reward import sequence_rewards
from finetune.tokenizer import load_tokenizer

HUB_BASE = "someuser/recital-gpt2"
EVAL = {"loss": 0.42, "perplexity": 1.52, "bits_per_byte": 0.61, "tokens": 900,
        "baseline": {"loss": 5.1, "perplexity": 164.0, "bits_per_byte": 7.4, "tokens": 900}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_paths(finished_runs: dict[str, Path]) -> dict[str, Path]:
    paths = finished_runs
    run = load_recipe(paths["lora"]).run
    run.eval_results.write_text(json.dumps({**EVAL, "weights_digest": weight_files_digest(run.final)}))
    return paths


@pytest.fixture(scope="module")
def lora(run_paths: dict[str, Path]) -> Recipe:
    return load_recipe(run_paths["lora"])


@pytest.fixture
def hub_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recital_base: Path) -> Path:
    """Make HUB_BASE resolvable offline, as a user's copy of the base would be: transformers loads a folder
    named like a repo id relative to the working directory."""
    (tmp_path / HUB_BASE).parent.mkdir(parents=True)
    (tmp_path / HUB_BASE).symlink_to(recital_base, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def probe_ids(recipe: Recipe) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(recipe.run.final)
    return torch.tensor([tokenizer(RECITAL)["input_ids"][:100]])


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits


def run_usage_snippet(folder: Path, repo: str, capsys: pytest.CaptureFixture) -> str:
    """Execute the model card's Python snippet with the repo id pointing at the upload folder."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert repr(repo) in code
    exec(compile(code.replace(repr(repo), repr(str(folder))), "README.md", "exec"), {})
    return capsys.readouterr().out


def test_merge_gives_a_plain_transformers_model_with_the_adapters_logits(lora: Recipe, run_paths) -> None:
    assert main(["merge", str(run_paths["lora"])]) == 0
    merged = lora.run.merged
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert (merged / "tokenizer.json").is_file() and (merged / "recipe.yaml").is_file()
    assert str(lora.run.root.resolve().parent) not in (merged / "recipe.yaml").read_text()  # merged/ is for sharing
    assert not merged.with_name("merged.tmp").exists()
    ids = probe_ids(lora)
    adapter = logits(load_final(lora.run.final), ids)
    plain = logits(AutoModelForCausalLM.from_pretrained(merged), ids)
    base = logits(AutoModelForCausalLM.from_pretrained(lora.model.base), ids)
    assert torch.allclose(plain, adapter, atol=1e-5)
    assert (base - adapter).abs().max() > 1e-2  # the adapter is not a no-op, so the comparison means something


def test_merge_refuses_a_run_without_an_adapter(run_paths, capsys: pytest.CaptureFixture) -> None:
    assert main(["merge", str(run_paths["full"])]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_push_refuses_an_adapter_whose_base_is_only_a_local_folder(run_paths, capsys) -> None:
    assert main(["push", str(run_paths["lora"]), "--repo", "me/tiny-lora", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--base-model" in err and "--merged" in err


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's
def test_push_dry_run_of_the_adapter(lora: Recipe, run_paths, hub_copy: Path, capsys) -> None:
    assert main(["push", str(run_paths["lora"]), "--repo", "me/tiny-lora", "--dry-run",
                 "--base-model", HUB_BASE]) == 0
    out = capsys.readouterr().out
    folder = lora.run.hub
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "eval.json", "README.md"} <= names
    assert "would upload" in out and "adapter_model.safetensors" in out
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == HUB_BASE and card.data.library_name == "peft"
    assert {"lora", "peft", "text", "gpt2-finetune"} <= set(card.data.tags)
    assert card.data.metrics == ["loss", "perplexity", "bits_per_byte"] and card.data.datasets is None
    assert "| perplexity | 1.52 | 164 |" in card.text
    ids = probe_ids(lora)
    loaded = AutoPeftModelForCausalLM.from_pretrained(folder)  # as a user would, base resolved from HUB_BASE
    assert torch.allclose(logits(loaded, ids), logits(load_final(lora.run.final), ids), atol=1e-5)
    assert run_usage_snippet(folder, "me/tiny-lora", capsys).strip()
    local = str(lora.run.root.resolve().parent)  # the test's folder: runs, data files, the base model
    for path in folder.iterdir():
        if path.suffix in (".json", ".yaml", ".md"):
            assert local not in path.read_text(), f"{path.name} names a local path"
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["model"]["base"] == HUB_BASE


def test_push_dry_run_of_the_merged_model(lora: Recipe, run_paths, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(run_paths["lora"]), "--repo", "me/tiny-merged", "--merged", "--dry-run"]) == 0
    folder = lora.run.hub
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert "adapter_config.json" not in names
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "base_model" not in card.data.to_dict()
    assert run_usage_snippet(folder, "me/tiny-merged", capsys).strip()


class RecordingHub:
    """Takes HfApi's place at the two calls push makes, checks them against HfApi's real signatures and records
    them. The Hub cannot be reached from the tests; nothing here reports an upload as done to a user."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.files: list[str] = []

    def _record(self, name: str, kwargs: dict) -> None:
        inspect.signature(getattr(HfApi, name)).bind(None, **kwargs)
        self.calls.append((name, kwargs))

    def create_repo(self, **kwargs) -> None:
        self._record("create_repo", kwargs)

    def upload_folder(self, **kwargs) -> None:
        self._record("upload_folder", kwargs)
        self.files = sorted(os.listdir(kwargs["folder_path"]))


def test_push_uploads_the_checked_folder_through_hf_api(lora: Recipe, hub_copy, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    hub = RecordingHub()
    folder = push(lora, "me/tiny-lora", private=True, base_model=HUB_BASE, api=hub)
    (create, create_args), (upload, upload_args) = hub.calls
    assert create == "create_repo"
    assert create_args == {"repo_id": "me/tiny-lora", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload == "upload_folder" and upload_args["repo_id"] == "me/tiny-lora"
    assert upload_args["folder_path"] == str(folder) and upload_args["repo_type"] == "model"
    assert {"README.md", "adapter_model.safetensors", "eval.json", "recipe.yaml"} <= set(hub.files)
    captured = capsys.readouterr()
    assert "hf_secret_never_printed" not in captured.out + captured.err
    assert "pushed: https://huggingface.co/me/tiny-lora" in captured.out


def test_push_needs_a_login_and_a_valid_repo_id(lora: Recipe, run_paths, tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(run_paths["lora"]), "--repo", "me/tiny", "--merged"]) == 2
    assert "not logged in" in capsys.readouterr().err
    assert main(["push", str(run_paths["lora"]), "--repo", "not a repo!", "--dry-run"]) == 2
    assert "--repo" in capsys.readouterr().err


def test_a_failed_upload_is_a_user_error_without_the_token(lora: Recipe, hub_copy, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_never_printed")
    unreachable = HfApi(endpoint="http://127.0.0.1:9", token="hf_secret_never_printed")
    with pytest.raises(UserError, match="upload to me/tiny-lora failed") as failure:
        push(lora, "me/tiny-lora", base_model=HUB_BASE, api=unreachable)
    assert "hf_secret_never_printed" not in str(failure.value)


# --- runs of the preference objectives ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preference_runs(recital_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Recipe files of two short runs of `finetune train` over the recital base on separable preference pairs: `dpo`
    (a LoRA adapter) and `reward` (a full reward model)."""
    folder = tmp_path_factory.mktemp("preference")
    pairs = separable_pairs(40, seed=12)
    paths = {"dpo": write_run(folder, recital_base, pairs, {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all"},
                              name="tiny-dpo", max_steps=10, save_steps=10),
             "reward": write_run(folder, recital_base, pairs, name="tiny-reward", objective="reward", max_steps=10,
                                 save_steps=10)}
    runs = [subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path)], env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for path in paths.values()]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()[-3000:]
    return paths


@pytest.mark.slow  # the two training runs: 20 to 70 s on a shared 2-core machine
def test_a_lora_dpo_run_merges_generates_and_pushes_a_card_saying_how_it_was_trained(
        preference_runs, recital_base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = load_recipe(preference_runs["dpo"])
    assert main(["merge", str(preference_runs["dpo"])]) == 0
    ids = probe_ids(recipe)
    adapter = logits(load_final(recipe.run.final), ids)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(recipe.run.merged), ids), adapter, atol=1e-5)
    assert (logits(AutoModelForCausalLM.from_pretrained(recital_base), ids) - adapter).abs().max() > 1e-3  # trained
    capsys.readouterr()
    assert main(["generate", str(preference_runs["dpo"]), "--prompt", "alpha beta", "--max-new-tokens", "8",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(preference_runs["dpo"]), "--repo", "me/tiny-dpo", "--merged", "--dry-run"]) == 0
    card = ModelCard.load(recipe.run.hub / "README.md")
    assert {"dpo", "preference"} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert ("- objective: DPO (Rafailov et al. 2023, sigmoid loss) on pairs of chosen and rejected responses "
            "(`preference` format); train.preference: beta 0.1, label_smoothing 0.0") in card.text
    assert "- reference model: the base model with the adapter switched off" in card.text
    assert run_usage_snippet(recipe.run.hub, "me/tiny-dpo", capsys).strip()
    figures = {"pair_accuracy": 0.9, "kl_to_reference": 1.25, "baseline": {"pair_accuracy": 0.5}}
    text = model_card(recipe, "me/tiny-dpo", False, None, figures).text
    assert "| pair_accuracy | 0.9 | 0.5 |" in text and "| kl_to_reference | 1.25 | |" in text


@pytest.mark.slow
def test_a_reward_model_pushes_with_a_card_that_scores_as_trained(preference_runs, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    recipe = load_recipe(preference_runs["reward"])
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(preference_runs["reward"]), "--repo", "me/tiny-reward", "--dry-run"]) == 0
    folder = recipe.run.hub
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "reward-model" in card.data.tags
    assert "a reward model: GPT-2 with a scalar head" in card.text and "Bradley-Terry" in card.text
    assert "AutoModelForSequenceClassification.from_pretrained('me/tiny-reward')" in card.text
    capsys.readouterr()
    printed = float(run_usage_snippet(folder, "me/tiny-reward", capsys))
    # the snippet's reward is the one training reads: the reply as prepare tokenizes it, scored in a packed row
    fmt = data_format(recipe.data)
    record, _ = fmt.normalize({"prompt": fmt.card_example, "chosen": "A reply to score.", "rejected": "-"}, "row")
    prompt, chosen, _ = (encode_segments(load_tokenizer(str(recipe.run.final)), [s])[0][0]
                         for s in fmt.pair_segments(record))
    row = {"input_ids": prompt + chosen, "labels": [-100] * len(prompt) + chosen,
           "position_ids": list(range(len(prompt) + len(chosen)))}
    with torch.no_grad():
        trained = sequence_rewards(load_final(recipe.run.final).eval(), PairCollator(0)([row]))
    assert printed == pytest.approx(trained.item(), abs=1e-5)  # float32 rounding (test_reward: 6e-6 measured)
