"""One offline run per shipped recipe, as torchtune tests its recipes: the recipe file as shipped, with a tiny
GPT-2 standing in for the Hub model and a slice of the same public data set (../shared/data) for the Hub data,
through prepare -> train -> eval on the command line. A recipe that no longer prepares, trains or evaluates
fails here, not in a user's hands. Only sizes (steps, rows, block size) and the stand-ins are overridden."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, save_tiny_gpt2
from finetune import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared" / "data"
# Hub recipes: the local copy of their data set, and how its columns differ from the Hub's.
HUB_STAND_INS = {
    "gpt2-lora-wikitext2": ("wikitext-2/wikitext2_validation.txt", []),
    "gpt2-medium-lora-e2e": ("e2e/devset.csv", ["data.instruction.instruction_field=mr",
                                                "data.instruction.output_field=ref"]),
    "gpt2-alpaca": ("alpaca/alpaca_en_demo.json", []),
    "gpt2-chat": ("chat/dummy_conversation.json", []),
    "gpt2-dpo-hh": ("preference/hh-rlhf-harmless-base-test.jsonl.gz", ["data.preference.max_prompt_tokens=64"]),
    "gpt2-reward-hh": ("preference/hh-rlhf-harmless-base-test.jsonl.gz", ["data.preference.max_prompt_tokens=64"]),
    "gpt2-kto": ("preference/kto_en_demo.json", ["data.feedback.max_prompt_tokens=128"]),
    "gpt2-grpo-no-errors": ("alpaca/alpaca_en_demo.json", ["data.block_size=96", "rl.max_completion_tokens=8",
                                                            "rl.group_size=2"]),
}
SHORT = ["train.max_steps=2", "train.save_steps=2", "train.eval_steps=2", "train.batch_size=2",
         "train.report_to=none", "eval.max_examples=8", "eval.generate_samples=2", "eval.max_new_tokens=4"]


def shipped(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def run(name: str, output: Path, overrides: list[str]) -> dict:
    """prepare, train and eval the shipped recipe `name` into `output`; its eval.json."""
    stride = shipped(name).get("eval", {}).get("stride")
    overrides = [f"output_dir={output}", *SHORT, *(["eval.stride=32"] if stride else []), *overrides]
    recipe = str(RECIPES / f"{name}.yaml")
    for command in ("prepare", "train", "eval"):
        assert cli.main([command, recipe, *overrides]) == 0, f"{command} {name} failed"
    assert (output / "final" / "recipe.yaml").is_file()
    figures = json.loads((output / "eval.json").read_text())
    assert all(math.isfinite(value) for value in numbers(figures)), figures
    return figures


def numbers(figures: object) -> list[float]:
    if isinstance(figures, dict):
        return [n for value in figures.values() for n in numbers(value)]
    if isinstance(figures, list):
        return [n for value in figures for n in numbers(value)]
    return [float(figures)] if isinstance(figures, (int, float)) and not isinstance(figures, bool) else []


@pytest.fixture(scope="module")
def tiny_gpt2_vocab_model(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with the real GPT-2 tokenizer, standing in for gpt2 and gpt2-medium."""
    if not (SHARED / "gpt2-tokenizer" / "vocab.json").is_file():
        pytest.skip("../shared/data/gpt2-tokenizer is absent")
    from finetune.tokenizer import load_tokenizer

    return save_tiny_gpt2(load_tokenizer(str(SHARED / "gpt2-tokenizer")), tmp_path_factory.mktemp("gpt2-vocab"),
                          n_layer=1, n_head=2, n_embd=16, n_positions=256)


@pytest.mark.parametrize("name", sorted(HUB_STAND_INS))
def test_hub_recipe_runs_offline_with_stand_ins(name, tmp_path, tiny_gpt2_vocab_model):
    data, columns = HUB_STAND_INS[name]
    if not (SHARED / data).is_file():
        pytest.skip(f"../shared/data/{data} is absent")
    stand_ins = [f"model.base={tiny_gpt2_vocab_model}", f"data.train={SHARED / data}", "data.validation=null",
                 "data.max_records=80", "data.block_size=256", *columns]
    figures = run(name, tmp_path / name, stand_ins)
    assert "baseline" in figures
    if shipped(name)["data"]["format"] == "preference":
        assert 0 <= figures["pair_accuracy"] <= 1 and figures["pairs"] > 0, figures
    if shipped(name)["data"]["format"] == "feedback":
        assert 0 <= figures["desirable_favoured"] <= 1 and figures["completions"] > 0, figures


def test_mixture_recipe_runs_offline_on_the_chat_and_alpaca_samples(tmp_path, tiny_gpt2_vocab_model):
    """gpt2-alpaca-chat with the two samples standing in for its Hub sets (conversations read twice, Alpaca rows as
    one-turn chats): each source carves its own validation rows, and the manifest counts every pass of each."""
    chat, alpaca = SHARED / "chat" / "dummy_conversation.json", SHARED / "alpaca" / "alpaca_en_demo.json"
    if not (chat.is_file() and alpaca.is_file()):
        pytest.skip("../shared/data's chat or alpaca sample is absent")
    train = f"data.train=[{{path: {chat}, weight: 2}}, {{path: {alpaca}, instruction_field: instruction}}]"
    run("gpt2-alpaca-chat", tmp_path / "mix", [f"model.base={tiny_gpt2_vocab_model}", train, "data.max_records=80",
                                               "data.block_size=256"])
    manifest = json.loads((tmp_path / "mix" / "prepared" / "manifest.json").read_text())
    carved = round(80 * shipped("gpt2-alpaca-chat")["data"]["validation_fraction"])
    assert [(s["split"], s["source"], s["records_in"], s["records_kept"]) for s in manifest["sources"]] == [
        ("train", str(chat), 2 * (80 - carved), 2 * (80 - carved)), ("train", str(alpaca), 80 - carved, 80 - carved),
        ("validation", str(chat), carved, carved), ("validation", str(alpaca), carved, carved)]
    assert sum(s["token_share"] for s in manifest["sources"] if s["split"] == "train") == pytest.approx(1, abs=2e-4)


def test_imdb_sentiment_recipe_runs_offline_rewarded_by_the_sst2_recipes_classifier(tmp_path, tiny_gpt2_vocab_model):
    """gpt2-lora-sst2 trains the classifier that gpt2-grpo-imdb rewards with; SST-2's sentences stand in for IMDb's
    reviews as prompts (their first 8 words)."""
    data = SHARED / "sst2" / "train.tsv"
    if not data.is_file():
        pytest.skip("../shared/data/sst2/train.tsv is absent")
    stand_ins = [f"model.base={tiny_gpt2_vocab_model}", f"data.train={data}", "data.validation=null",
                 "data.max_records=80", "data.block_size=256"]
    figures = run("gpt2-lora-sst2", tmp_path / "sst2", stand_ins)
    assert 0 <= figures["accuracy"] <= 1 and "baseline" in figures
    reward = f"rl.rewards=[{{model: {tmp_path / 'sst2' / 'final'}, label: positive}}]"
    figures = run("gpt2-grpo-imdb", tmp_path / "imdb", [*stand_ins[:-1], "data.prompt.prompt_field=sentence", reward,
                                                         "rl.group_size=2", "rl.max_completion_tokens=8"])
    for side in (figures, figures["baseline"]):
        assert 0 <= side["reward_mean"] <= 1 and 0 <= side["heldout_reward_mean"] <= 1, figures
    prompts = [sample["prompt"] for sample in figures["reward_samples"]]
    assert prompts and all(len(prompt.split()) <= 8 for prompt in prompts)


def test_demo_recipes_run_in_sequence(tmp_path):
    """demo-pretrain trains a model from scratch; demo-tune (and demo-tune-harness) tune it with LoRA; demo-dpo tunes
    it with DPO, judged by demo-tune's classifier; demo-grpo tunes it with GRPO, rewarded by that classifier and
    judged by a word list."""
    run("demo-pretrain", tmp_path / "demo-pretrain", ["data.max_records=400"])
    tuned = [f"model.base={tmp_path / 'demo-pretrain' / 'final'}", "data.max_records=80", "eval.shots=2"]
    figures = run("demo-tune", tmp_path / "demo-tune", tuned)
    assert 0 <= figures["accuracy"] <= 1
    judge = f"eval.rewards=[{{model: {tmp_path / 'demo-tune' / 'final'}, label: positive}}]"
    figures = run("demo-dpo", tmp_path / "demo-dpo", [*tuned[:2], "eval.policy.prompts=4", judge])
    assert 0 <= figures["heldout_reward_mean"] <= 1 and 0 <= figures["baseline"]["heldout_reward_mean"] <= 1
    reward = f"rl.rewards=[{{model: {tmp_path / 'demo-tune' / 'final'}, label: positive}}]"
    figures = run("demo-grpo", tmp_path / "demo-grpo", [*tuned[:2], reward, "rl.group_size=2",
                                                        "rl.max_completion_tokens=8"])
    for side in (figures, figures["baseline"]):
        assert 0 <= side["reward_mean"] <= 1 and 0 <= side["heldout_reward_mean"] <= 1, figures
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[harness]'): demo-tune-harness not run")
    figures = run("demo-tune-harness", tmp_path / "demo-tune-harness", [*tuned, "eval.harness.limit=4"])
    assert set(figures["harness"]) >= {"demo_sentiment", "demo_reviews_bpb"}


def test_demo_grpo_word_judge_agrees_with_the_demo_labels():
    """demo-grpo's held-out judge calls every labelled demo review what its label says (all praise: 1, all fault: 0)
    and a review with neither word list's words undecided (0.5)."""
    spec = importlib.util.spec_from_file_location("review_words", RECIPES / "rewards" / "review_words.py")
    judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge)
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "sentiment_validation.jsonl").open()]
    assert [judge.praise_share(row["review"]) for row in rows] == [float(row["label"] == "positive") for row in rows]
    assert judge.praise_share("The lamp is dimmer and sturdy. Not worth") == 0.5  # "dimmer" is not "dim"


def test_scratch_recipe_runs(tmp_path):
    run("scratch-text", tmp_path / "scratch-text", ["data.max_records=400", "tokenizer.train.vocab_size=512"])


def test_every_shipped_recipe_has_a_run_here():
    tested = {*HUB_STAND_INS, "gpt2-alpaca-chat", "gpt2-lora-sst2", "gpt2-grpo-imdb", "demo-pretrain", "demo-tune",
              "demo-tune-harness", "demo-dpo", "demo-grpo", "scratch-text"}
    assert {path.stem for path in RECIPES.glob("*.yaml")} == tested
