"""Reward RL (issue 23): the `prompt` format, the `rl` recipe section, GRPO / RLOO advantages against a hand
computation and losses against TRL 1.16's own loss code, padded completions scored as unpadded ones (where TRL's
scoring pass is not), a reward a tiny GPT-2 learns (faster without the KL term), and wrong rewards stopping the run.

Bounds: LOGP_ABSOLUTE is float32 rounding of per-token log-probs (measured in
test_a_left_padded_row_scores_as_the_row_alone_and_trls_pass_does_not); TRL_RELATIVE is float64 rounding in the
losses and gradients (measured in test_losses_and_gradients_equal_trls)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import subprocess_env, trl_deprecations, write_recipe_file
from rl_runs import write_rl_run
from finetune.cli import main
from finetune.errors import UserError
from finetune.evaluation import distinct_bigrams, evaluate
from finetune.formats import data_format
from finetune.formats.prompt import PromptFormat
from finetune.loss import token_logps
from finetune.plots import read_metrics
from finetune.prepare import prepare
from finetune.prepared import load_prepared, load_records
from finetune.recipe import DataConfig, load_recipe
from finetune.report import table_cell
from finetune.rl.config import RewardSpec
from finetune.rl.objectives import TokenLogps, grpo_advantages, grpo_loss, rloo_advantages, rloo_loss
from finetune.rl.rewards import Completions, load_function
from finetune.rl.trainer import rollout_batch
from finetune.train import train

# Per-token log-probs of a completion (float32, about -6 each here): its row in a padded batch against the row alone
# agreed bitwise here, chunked (3) and unchunked; TRL's pass on the row alone differs from ours by up to 4.8e-7 (its
# fused head sums in another order). 10x that:
LOGP_ABSOLUTE = 5e-6
TRL_RELATIVE = 1e-12  # float64 on both sides: at most 2.2e-15 relative (loss and gradients) over 5 random draws


# --- the prompt format --------------------------------------------------------------------------------------

def test_prompt_rows_keep_their_columns_and_chat_prompts_use_the_template() -> None:
    fmt = data_format(DataConfig(format="prompt"))
    record, _ = fmt.normalize({"prompt": "Once upon", "answer": "a time", "id": 3}, "row 1")
    assert record == {"prompt": "Once upon", "columns": {"answer": "a time", "id": 3}}
    assert fmt.segments(record) == [("Once upon", False)]  # continued as written
    chat, _ = fmt.normalize({"prompt": [{"role": "user", "content": "Hi"}]}, "row 2")
    assert fmt.segments(chat) == [("User: Hi\n\nAssistant:", False)]
    assert fmt.normalize({"prompt": "  "}, "row 3") == (None, "empty")
    with pytest.raises(UserError, match="row 4: missing field 'prompt'"):
        fmt.normalize({"text": "x"}, "row 4")


def test_prefix_words_keeps_a_text_prompts_opening_and_leaves_chat_prompts_whole() -> None:
    """The IMDb setting: the opening words of a review, its own spacing kept; the rewards see the cut prompt."""
    fmt = data_format(DataConfig(format="prompt", prompt=PromptFormat(prompt_field="text", prefix_words=3)))
    record, _ = fmt.normalize({"text": "I rented I AM CURIOUS-YELLOW<br /><br />from my", "label": 0}, "row 1")
    assert record == {"prompt": "I rented I", "columns": {"label": 0}}
    record, _ = fmt.normalize({"text": "Great\n film,  truly great", "label": 1}, "row 2")
    assert record["prompt"] == "Great\n film,  truly"
    assert fmt.normalize({"text": "Short one"}, "row 3")[0]["prompt"] == "Short one"
    messages = [{"role": "user", "content": "one two three four"}]
    assert fmt.normalize({"text": messages}, "row 4")[0]["prompt"] == messages


def test_prepare_stores_one_prompt_per_row_and_counts_the_dropped(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe_path = write_rl_run(tmp_path, tiny_model_dir, prompts=20)
    with (tmp_path / "prompts.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt": " ".join(["alpha"] * 40), "answer": "x"}) + "\n")  # over the block
        handle.write(json.dumps({"prompt": "", "answer": "x"}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"prompt": "omega"}) + "\n")
    recipe = load_recipe(recipe_path, [f"data.validation={tmp_path / 'validation.jsonl'}"])
    manifest = prepare(recipe)
    train_split = manifest["train"]
    assert train_split["records_in"] == 22 and train_split["records_kept"] == 20
    assert train_split["records_dropped"] == {"empty": 1, "prompt_too_long": 1}
    store, records = load_prepared(recipe, "train"), load_records(recipe, "train")
    assert len(store) == len(records) == train_split["sequences"] == 20  # no packing: row i is prompt i
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()[:20]]
    assert [r["prompt"] for r in records] == [row["prompt"] for row in rows]
    assert [r["columns"] for r in records] == [{"answer": row["answer"]} for row in rows]
    assert all((store[i]["labels"] == -100).all() for i in range(len(store)))  # nothing is a target


# --- the rl section -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"rl": {"rewards": []}}, "needs at least one reward under 'rl.rewards'"),
    ({"rl": {"rewards": [{"function": "rewards.py:has_red", "model": "final"}]}}, "set exactly one of 'function'"),
    ({"rl": {"rewards": [{"function": "nope.py:f"}]}}, "file .*nope.py not found"),
    ({"rl": {"rewards": [{"function": "has_red"}]}}, "must be module:name or path/to/file.py:name"),
    ({"rl": {"rewards": [{"function": "rewards.py:has_red", "label": "positive"}]}}, "'label' applies to a 'model'"),
    ({"rl": {"rewards": [{"function": "rewards.py:has_red", "weight": float("nan")}]}},
     "weight' must be a finite number"),
    ({"rl": {"group_size": 1}}, "'rl.group_size' must be at least 2"),
    ({"rl": {"beta": -0.1}}, "'rl.beta' must be at least 0"),
    ({"data": {"format": "text"}},
     r"'train.objective' = grpo does not train on data.format text \(it needs data.format: prompt\)"),
    ({"train": {"objective": "sft"}},
     "does not train on data.format prompt; data.format prompt trains with grpo or rloo"),
])
def test_rl_recipe_mistakes_are_refused_at_load(tmp_path: Path, tiny_model_dir: Path, change: dict,
                                                 message: str) -> None:
    raw = __import__("yaml").safe_load(write_rl_run(tmp_path, tiny_model_dir).read_text())
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(UserError, match=message):
        load_recipe(write_recipe_file(tmp_path / "changed.yaml", raw))


def test_prompts_and_completions_must_fit_the_context(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_rl_run(tmp_path, tiny_model_dir, max_completion_tokens=97))  # block 32, 128 positions
    with pytest.raises(UserError, match=r"'rl.max_completion_tokens' \(97\) exceed the model's context length"):
        train(recipe)


def test_reward_paths_are_relative_to_the_recipe(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_rl_run(tmp_path, tiny_model_dir, rewards=[{"function": "rewards.py:has_red"},
                                                                         {"model": "scorer/final", "label": "good"}]))
    assert recipe.rl.rewards == [RewardSpec(function=f"{tmp_path / 'rewards.py'}:has_red"),
                                 RewardSpec(model=str(tmp_path / "scorer" / "final"), label="good")]


# --- advantages and losses ----------------------------------------------------------------------------------

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, float("nan"), 3.0]],
                       dtype=torch.float64)


def test_grpo_advantages_equal_a_hand_computation() -> None:
    half = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # group 1: mean 1/2, unbiased std sqrt(1/3)
    spread = math.sqrt(7 / 3) + 1e-4  # group 3 without its NaN: 0, 1, 3, mean 4/3, unbiased std sqrt(7/3)
    expected = [[half, -half, -half, half], [0.0] * 4,
                [(0 - 4 / 3) / spread, (1 - 4 / 3) / spread, 0.0, (3 - 4 / 3) / spread]]
    assert torch.allclose(grpo_advantages(REWARDS, scale=True), torch.tensor(expected, dtype=torch.float64),
                          rtol=0, atol=1e-12)
    unscaled = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-4 / 3, -1 / 3, 0.0, 5 / 3]]
    assert torch.allclose(grpo_advantages(REWARDS, scale=False), torch.tensor(unscaled, dtype=torch.float64),
                          rtol=0, atol=1e-12)


def test_rloo_advantages_equal_a_hand_computation() -> None:
    # each reward minus the mean of the others of its group (group 3: the NaN is no opinion, left out)
    expected = [[1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [0.0] * 4, [0 - 2.0, 1 - 1.5, 0.0, 3 - 0.5]]
    advantages = rloo_advantages(REWARDS, normalize=False)
    assert torch.allclose(advantages, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    normalized = rloo_advantages(REWARDS, normalize=True)
    scorable = torch.tensor(expected, dtype=torch.float64).flatten()[~REWARDS.flatten().isnan()]
    assert torch.allclose(normalized.flatten()[~REWARDS.flatten().isnan()],
                          (scorable - scorable.mean()) / (scorable.std() + 1e-4), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def trl_trainers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """TRL 1.16's GRPOTrainer (loss_type grpo, beta 0.04) and RLOOTrainer on the tiny model, never trained: their
    loss code is the reference."""
    trl = pytest.importorskip("trl", minversion="1.16", reason="TRL is the GRPO/RLOO reference")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from finetune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("trl")
    common = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to="none",
                  use_cpu=True, bf16=False)
    data = Dataset.from_list([{"prompt": "alpha beta"}] * 4)

    def no_reward(completions, **columns):
        return [0.0] * len(completions)

    grpo = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[no_reward],
                           args=trl.GRPOConfig(output_dir=str(folder / "grpo"), beta=0.04, loss_type="grpo", **common),
                           train_dataset=data, processing_class=tokenizer)
    rloo = trl.RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[no_reward],
                           args=trl.RLOOConfig(output_dir=str(folder / "rloo"), **common), train_dataset=data,
                           processing_class=tokenizer)
    for trainer in (grpo, rloo):
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
    return {"grpo": grpo, "rloo": rloo, "tokenizer": tokenizer}


def _trl_loss(trainer, policy: torch.Tensor, inputs: dict) -> torch.Tensor:
    """TRL's `_compute_loss` on the given per-token log-probs: its own model pass is the one step replaced."""
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (policy, torch.zeros_like(policy), None)
    try:
        return trainer._compute_loss(trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies  # TRL's own method again


@trl_deprecations
def test_losses_and_gradients_equal_trls(trl_trainers: dict) -> None:
    """Four completions of up to 6 tokens with random log-probs, sampling-time log-probs far enough from them that
    the clip acts (ratios from 0.5 to 2), a reference, and advantages of both signs; gradients with respect to the
    log-probs. Both sides in float64 agree to 2.2e-15 relative (measured over 5 draws; GRPO's loss exactly)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 3, 5, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths], dtype=torch.float64)
    policy = (-torch.rand(4, 6, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    old = policy.detach() + (torch.rand(4, 6, generator=generator, dtype=torch.float64) - 0.5) * 1.4
    reference = policy.detach() + (torch.rand(4, 6, generator=generator, dtype=torch.float64) - 0.5) * 2
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    logps = TokenLogps(policy, old, reference, mask)
    prompt = torch.ones(4, 2, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt, "completion_ids": torch.ones(4, 6, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages}
    cases = {
        "grpo": (grpo_loss(logps, advantages, beta=0.04, epsilon=0.2),
                 {**inputs, "old_per_token_logps": old, "ref_per_token_logps": reference}),
        "rloo": (rloo_loss(logps, advantages, epsilon=0.2), {**inputs, "old_logps": (old * mask).sum(1)}),
    }
    for name, (ours, trl_inputs) in cases.items():
        (ours_grad,) = torch.autograd.grad(ours, policy)
        theirs = _trl_loss(trl_trainers[name], policy, trl_inputs)
        (trl_grad,) = torch.autograd.grad(theirs, policy)
        assert abs(ours.item() - theirs.item()) <= TRL_RELATIVE * abs(theirs.item()), name
        assert (ours_grad - trl_grad).abs().max().item() <= TRL_RELATIVE * trl_grad.abs().max().item(), name
        clipped = torch.exp(policy - old)[mask.bool()]
        assert clipped.min() < 0.8 and clipped.max() > 1.2  # the clip acts on some tokens


def test_rloo_kl_penalty_is_the_sequence_log_ratio_to_the_reference() -> None:
    from finetune.rl.objectives import sequence_log_ratio

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    reference = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert sequence_log_ratio(TokenLogps(old, old, reference, mask)).tolist() == [-0.5, 0.5]


def test_a_left_padded_row_scores_as_the_row_alone_and_trls_pass_does_not(trl_trainers: dict) -> None:
    """Completion log-probs of a short prompt's row, padded by 6 tokens beside a long prompt, against the row
    alone: ours (position ids from the attention mask) agree to float32 rounding, chunked or not; TRL's scoring
    pass (GRPOTrainer._get_per_token_logps_and_entropies, no position ids) moves them, although it agrees with
    ours on the row alone. The completion ends with EOS, which is also the pad id, and is scored. Measured: TRL's
    padded row moves by up to 0.163 per token (sum -40.583 alone, -40.316 padded by 6)."""
    tokenizer, trl = trl_trainers["tokenizer"], trl_trainers["grpo"]
    eos = tokenizer.eos_token_id
    model = trl.model.eval()  # TRL's copy of the tiny model (its forward is the original one unless TRL asks)
    short, long = tokenizer.encode(" red green"), tokenizer.encode(" alpha beta gamma delta epsilon zeta")
    completion, other = tokenizer.encode(" blue cyan") + [eos], tokenizer.encode(" omega")
    assert len(long) - len(short) >= 6
    padded = rollout_batch([short, long], [completion, other], eos)
    alone = rollout_batch([short], [completion], eos)
    width, n = len(long), len(completion)
    assert padded["labels"][0, width + n - 1] == eos  # the EOS is a target
    for chunk in (None, 3):
        with torch.no_grad():
            ours_padded = token_logps(model, padded, chunk)[0][0, width - 1:width - 1 + n]
            ours_alone = token_logps(model, alone, chunk)[0][0, len(short) - 1:]
        assert len(ours_alone) == n and (ours_alone < 0).all()
        assert (ours_padded - ours_alone).abs().max().item() <= LOGP_ABSOLUTE
    with torch.no_grad():
        trl_padded = trl._get_per_token_logps_and_entropies(model, padded["input_ids"], padded["attention_mask"],
                                                           padded["input_ids"].size(1) - width)[0][0, :n]
        trl_alone = trl._get_per_token_logps_and_entropies(model, alone["input_ids"], alone["attention_mask"], n)[0][0]
    assert (trl_alone - ours_alone).abs().max().item() <= LOGP_ABSOLUTE
    assert (trl_padded - trl_alone).abs().max().item() > 100 * LOGP_ABSOLUTE


# --- rewards ------------------------------------------------------------------------------------------------

def _batch() -> Completions:
    return Completions(prompts=["a", [{"role": "user", "content": "b"}]], prompt_texts=["a", "User: b\n\nAssistant:"],
                       texts=[" red", " blue"], columns=[{"answer": "red"}, {"answer": "green"}])


def test_both_function_shapes_get_what_the_recipe_says(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text(
        "def text(t):\n    return len(t)\n"
        "def trl(prompts, completions, answer, **columns):\n"
        "    assert prompts == ['a', [{'role': 'user', 'content': 'b'}]]\n"
        "    assert completions == [' red', [{'role': 'assistant', 'content': ' blue'}]]\n"
        "    assert answer == ['red', 'green'] and columns == {}\n"
        "    return [1.0, None]\n")
    full = load_function(RewardSpec(function=f"{tmp_path / 'f.py'}:text"), full_text=True)
    assert full(_batch()) == [5.0, 24.0]  # "a red", "User: b\n\nAssistant: blue"
    assert load_function(RewardSpec(function=f"{tmp_path / 'f.py'}:text"), full_text=False)(_batch()) == [4.0, 5.0]
    trl = load_function(RewardSpec(function=f"{tmp_path / 'f.py'}:trl"), full_text=True)
    assert trl(_batch()) == [1.0, None]
    assert trl.name == "trl"


@pytest.mark.parametrize("body, message", [
    ("return [1.0]", "reward bad returned 1 values for 2 completions"),
    ("return [1.0, 'x']", "reward bad returned str 'x'; a reward must be a number"),
    ("return [1.0, float('nan')]", "reward bad returned nan; a reward must be a finite number"),
    ("return 3", "reward bad returned int for 2 completions"),
])
def test_a_wrong_reward_is_one_error_naming_it(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "f.py").write_text(f"def bad(prompts, completions, **columns):\n    {body}\n")
    with pytest.raises(UserError, match=message):
        load_function(RewardSpec(function=f"{tmp_path / 'f.py'}:bad"), full_text=True)(_batch())


def test_a_wrong_reward_stops_train_with_exit_2(tmp_path: Path, tiny_model_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    recipe = write_rl_run(tmp_path, tiny_model_dir, rewards=[{"function": "rewards.py:has_red"},
                                                              {"function": "wrong.py:not_a_number"}])
    (tmp_path / "wrong.py").write_text("def not_a_number(text):\n    return float('nan') if 'a' in text else 'high'\n")
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: reward not_a_number returned ")


# --- training -----------------------------------------------------------------------------------------------

def _rewards_and_kl(recipe: Path, *overrides: str) -> tuple[list[float], list[float]]:
    run = load_recipe(recipe, list(overrides))
    train(run)
    rows = [json.loads(line) for line in run.run.metrics.read_text().splitlines()]
    rows = [row for row in rows if "reward" in row]
    return [row["reward"] for row in rows], [row["kl"] for row in rows]


@pytest.mark.slow
def test_a_tiny_gpt2_learns_a_reward_faster_without_the_kl_term(tmp_path: Path, tiny_model_dir: Path,
                                                                one_thread) -> None:
    """Reward 1 for a completion containing "red" (2-6% of a random model's 8-token completions at the first steps).
    Measured over train.seed 0-3, 20 steps of 8 prompts x 8 completions: with beta 0 the first 3 steps' mean reward
    is 0.02-0.06 and the last 5 steps' 0.99-1.0 (KL 3.2-3.7 at the end); with beta 1 the last 5 steps' mean is
    0.11-0.15, 0.087-0.11 above its first 3 steps', and its KL at most 0.06 at the end."""
    free, free_kl = _rewards_and_kl(write_rl_run(tmp_path / "free", tiny_model_dir, beta=0.0, sample_log_steps=10),
                                    "train.max_steps=20", "train.report_to=tensorboard")
    held, held_kl = _rewards_and_kl(write_rl_run(tmp_path / "held", tiny_model_dir, beta=1.0), "train.max_steps=20")
    assert len(free) == len(held) == 20
    assert sum(free[:3]) / 3 < 0.15
    assert sum(free[-5:]) / 5 > 0.85
    assert sum(held[-5:]) / 5 < sum(free[-5:]) / 5 - 0.3
    assert sum(held[-5:]) / 5 > sum(held[:3]) / 3 + 0.05  # still learning, held back by the KL term
    assert max(held_kl) < 0.6 < max(free_kl)
    # eval: one completion per validation prompt, seeded alike for the tuned model and its base
    recipe = load_recipe(tmp_path / "free" / "rl.yaml",
                         [f"eval.rewards=[{{function: {tmp_path / 'free' / 'rewards.py'}:red_or_no_opinion}}]",
                          "rl.beta=0.0"])
    results = evaluate(recipe)
    base = results["baseline"]
    assert results["completions"] == base["completions"] == len(load_records(recipe, "validation"))
    # measured: 1.0 tuned, 0.0 base on the 3 validation prompts; the base may have 1 of 3 on another CPU's samples
    assert results["reward_mean"] > 0.85 > base["reward_mean"] + 0.5
    assert results["heldout_reward_mean"] == 1.0  # rewards only completions with "red": None for the others
    # against the base, per prompt (measured: won all 3; KL 32.1 +- 3.1 nats over 8-token completions; distinct-2
    # 0.38 against the base's 1.0: with beta 0 the policy repeats "red")
    assert results["win_rate"] > 0.8 and results["win_rate_prompts"] == 3
    assert results["kl_to_reference"] > 5 and results["kl_samples"] == 3
    assert results["distinct_2"] < 0.6 < base["distinct_2"]
    assert [s["prompt"] for s in results["reward_samples"]] == [s["prompt"] for s in base["reward_samples"]]
    report = recipe.run.report.read_text()
    assert f"| reward (training rewards) | {base['reward_mean']:.4f} | {results['reward_mean']:.4f} |" in report
    assert f"Tuned (reward {results['reward_samples'][0]['reward']:.4g}):" in report
    _assert_training_samples(recipe, report)


def _assert_training_samples(recipe, report: str) -> None:
    """Steps 1, 10 and 20 (rl.sample_log_steps 10) logged 4 completions each, one per prompt, with their has_red
    rewards; the first and last tables are in report.md, the tables in TensorBoard as text."""
    logged = [row for row in read_metrics(recipe.run.metrics) if "samples" in row]
    assert [row["step"] for row in logged] == [1, 10, 20]
    for row in logged:
        samples = row["samples"]
        assert [s["step"] for s in samples] == [row["step"]] * 4 and len({s["prompt"] for s in samples}) == 4
        assert all(s["reward"] == s["rewards"]["has_red"] == float("red" in s["completion"]) for s in samples)
    assert "## Completions sampled in training" in report
    for sample in (logged[0]["samples"][0], logged[-1]["samples"][-1]):
        assert f"| {sample['step']} | {table_cell(sample['prompt'])} | {table_cell(sample['completion'])} |" in report
    events = EventAccumulator(str(recipe.run.tensorboard), size_guidance={"tensors": 0})
    events.Reload()
    texts = {event.step: event.tensor_proto.string_val[0].decode()
             for event in events.Tensors("train/samples/text_summary")}
    assert texts.keys() == {1, 10, 20} and table_cell(logged[-1]["samples"][0]["completion"]) in texts[20]
    height, width = imread(recipe.run.loss_plot).shape[:2]
    assert (height, width) == (840, 840)  # 7 x 7 inches at 120 dpi: the reward panel below the loss (7 x 4 without)


def test_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path: Path, tiny_model_dir: Path,
                                                             capsys: pytest.CaptureFixture, one_thread) -> None:
    """Four steps, checkpoints at 2 and 4; then the step-4 checkpoint and final/ removed (a run killed after its
    step-2 checkpoint) and the run trained again: it resumes at step 2, samples the same completions (seeded by
    step and prompt) and ends with the same weights, bit for bit."""
    from safetensors.torch import load_file

    recipe = load_recipe(write_rl_run(tmp_path, tiny_model_dir), ["train.max_steps=4", "train.save_steps=2"])
    train(recipe)
    weights = load_file(recipe.run.final / "model.safetensors")
    logged = recipe.run.metrics.read_text().splitlines()
    shutil.rmtree(recipe.run.checkpoints / "checkpoint-4")
    shutil.rmtree(recipe.run.final)
    capsys.readouterr()
    train(recipe)
    assert f"resuming from {recipe.run.checkpoints / 'checkpoint-2'}" in capsys.readouterr().out
    resumed = load_file(recipe.run.final / "model.safetensors")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[key], resumed[key]) for key in weights)
    rewards = [[json.loads(line).get("reward") for line in lines[:4]]
               for lines in (logged, recipe.run.metrics.read_text().splitlines())]
    assert rewards[0] == rewards[1] and None not in rewards[0]


def test_distinct_2_counts_distinct_token_bigrams_over_all_completions() -> None:
    # bigrams (1,2) (2,1) (1,2) | (1,2) (2,3): 3 distinct of 5; a one-token completion has none
    assert distinct_bigrams([[1, 2, 1, 2], [1, 2, 3], [7]]) == 3 / 5
    assert distinct_bigrams([[5], []]) is None


def _moved_policy(folder: Path, tiny_model_dir: Path, noise: float) -> Path:
    """A prepared reward-RL run whose final/ is the base with Gaussian `noise` added to every weight, rewarded by a
    checksum of the completion's characters, which different texts rarely tie on, and judged by has_red (3
    validation prompts, so reward_samples shows them all; eval batches of 2); its recipe."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checksum.py").write_text("def checksum(text):\n    return float(sum(map(ord, text)) % 97)\n")
    path = write_rl_run(folder, tiny_model_dir, temperature=0.7, rewards=[{"function": "checksum.py:checksum"}])
    raw = yaml.safe_load(path.read_text())
    raw["eval"] = {"rewards": [{"function": "rewards.py:has_red"}], "batch_size": 2}
    recipe = load_recipe(write_recipe_file(path, raw))
    prepare(recipe)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    model.save_pretrained(recipe.run.final)
    for name in tiny_model_dir.iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            shutil.copy(name, recipe.run.final)
    return path


def _eval_against_base(folder: Path, tiny_model_dir: Path, noise: float) -> dict:
    return evaluate(load_recipe(_moved_policy(folder, tiny_model_dir, noise)))


def test_rl_eval_of_the_reference_itself_ties_every_prompt_at_zero_kl(tmp_path: Path, tiny_model_dir: Path,
                                                                       one_thread) -> None:
    results = _eval_against_base(tmp_path, tiny_model_dir, noise=0.0)
    base = results["baseline"]
    assert results["reward_samples"] == base["reward_samples"]  # the same completions, seeded alike
    assert results["win_rate"] == results["heldout_win_rate"] == 0.5  # every prompt a tie
    assert results["win_rate_prompts"] == results["heldout_win_rate_prompts"] == results["completions"] == 3
    assert results["kl_to_reference"] == 0.0 and results["kl_samples"] == 3  # the same log-probs, to the bit
    assert results["distinct_2"] == base["distinct_2"] and 0 < results["distinct_2"] <= 1
    assert results["completion_length_mean"] == base["completion_length_mean"]


def test_rl_eval_wins_per_prompt_and_estimates_kl_for_a_moved_policy(tmp_path: Path, tiny_model_dir: Path,
                                                                     one_thread) -> None:
    """The base with noise of 0.05 on every weight: its completions differ, so the win rate is the hand count over
    the 3 prompts (all in reward_samples; measured 2/3: one win, two prompts completed alike) and the KL estimate,
    the mean over its completions of log p_tuned - log p_ref, moves away from the 0 of the reference itself
    (measured: 0.82 +- 0.63 nats; sampled at rl.temperature 0.7 it need not be a true KL)."""
    results = _eval_against_base(tmp_path, tiny_model_dir, noise=0.05)
    rewards = [(s["reward"], b["reward"]) for s, b in zip(results["reward_samples"],
                                                          results["baseline"]["reward_samples"])]
    assert len(rewards) == 3 and any(tuned != base for tuned, base in rewards)
    assert results["win_rate"] == sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in rewards) / 3
    assert abs(results["kl_to_reference"]) > 0.1 and results["kl_to_reference_stderr"] > 0
    report = (tmp_path / "rl" / "report.md").read_text()
    assert f"| win rate against the base | - | {results['win_rate']:.2%} |" in report


@pytest.mark.slow
def test_rl_eval_on_two_processes_gives_the_figures_of_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Whole eval batches dealt to the processes (the 3 prompts in batches of 2 and 1): each batch samples and
    scores as in one process, so every figure is the same, to the bit."""
    path = _moved_policy(tmp_path, tiny_model_dir, noise=0.05)
    figures = []
    for launch in ([sys.executable], [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                                      "--num_processes", "2"]):
        done = subprocess.run([*launch, "-m", "finetune", "eval", str(path)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        figures.append(json.loads(load_recipe(path).run.eval_results.read_text()))
    one, two = figures
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["kl_to_reference"] > 0.1 and one["win_rate_prompts"] == 3  # a policy apart from its reference
    for key in ("win_rate", "heldout_win_rate", "kl_to_reference", "kl_to_reference_stderr", "kl_samples"):
        assert two[key] == one[key], key
    for a, b in ((one, two), (one["baseline"], two["baseline"])):
        for key in ("reward_mean", "heldout_reward_mean", "completion_length_mean", "distinct_2", "reward_samples"):
            assert b[key] == a[key], key

# --- trained scorers as rewards -----------------------------------------------------------------------------

def _texts() -> Completions:
    return Completions(prompts=["red", "omega"], prompt_texts=["red", "omega"],
                       texts=[" green blue cyan", " alpha"], columns=[{}, {}])


def test_a_classification_run_rewards_the_probability_of_its_label(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A classification run's final/ (the tiny model with a classification recipe.yaml beside it): the reward is
    P(label word) among the label words after the run's template, as plain transformers computes it on each text
    alone. The random model gives " good" about 1e-5; the log of the reward differs from plain transformers' by
    2e-6 at 1 and 2 threads (float32 log-probs), bounded at 10x."""
    from transformers import AutoModelForCausalLM

    from finetune.recipe import save_recipe
    from finetune.rl.rewards import load_scorer
    from finetune.tokenizer import load_tokenizer

    final = tmp_path / "classifier" / "final"
    shutil.copytree(tiny_model_dir, final)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "red", "label": "good"}) + "\n")
    raw = {"name": "classifier", "model": {"base": str(tiny_model_dir)},
           "data": {"train": str(tmp_path / "rows.jsonl"), "format": "classification",
                    "classification": {"labels": ["bad", "good"], "template": "{text} is"}}}
    save_recipe(load_recipe(write_recipe_file(tmp_path / "classifier.yaml", raw)), final / "recipe.yaml")
    scorer = load_scorer(RewardSpec(model=str(final), label="good"), full_text=True, device=torch.device("cpu"))
    rewards = scorer(_texts())
    tokenizer, model = load_tokenizer(str(final)), AutoModelForCausalLM.from_pretrained(final).eval()
    for text, reward in zip(["red green blue cyan", "omega alpha"], rewards):
        prompt = tokenizer.encode(f"{text} is")
        scores = []
        for word in (" bad", " good"):
            ids = tokenizer.encode(word)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            scores.append(logits[torch.arange(len(ids)), ids].sum())
        assert abs(math.log(reward) - torch.stack(scores).log_softmax(0)[1].item()) <= 2e-5
    assert scorer.name == "classifier:good"
    with pytest.raises(UserError, match=r"'label' must be one of its labels \['bad', 'good'\], got 'great'"):
        load_scorer(RewardSpec(model=str(final), label="great"), full_text=True, device=torch.device("cpu"))


def test_a_reward_model_rewards_its_score_of_the_text_closed_by_eos(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A reward model's final/ (GPT2ForSequenceClassification, one label, saved with no pad id as train saves it):
    texts of different lengths scored in one batch equal plain transformers on each text + EOS alone (rewards
    about 0.08: measured equal to 1.5e-8 at 1 and 2 threads; bounded at 1e-6)."""
    from transformers import AutoModelForSequenceClassification

    from finetune.rl.rewards import load_scorer
    from finetune.tokenizer import load_tokenizer

    torch.manual_seed(0)
    final = tmp_path / "reward" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = None
    model.save_pretrained(final)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.save_pretrained(final)
    scorer = load_scorer(RewardSpec(model=str(final)), full_text=False, device=torch.device("cpu"))
    rewards = scorer(_texts())
    plain = AutoModelForSequenceClassification.from_pretrained(final).eval()
    for text, reward in zip([" green blue cyan", " alpha"], rewards):
        with torch.no_grad():
            expected = plain(torch.tensor([tokenizer.encode(text) + [tokenizer.eos_token_id]])).logits.item()
        assert abs(reward - expected) <= 1e-6
    assert len(set(rewards)) == 2


def test_with_lora_the_reference_is_the_base_with_the_adapter_off(tmp_path: Path, tiny_model_dir: Path,
                                                                   one_thread) -> None:
    """A fresh adapter changes nothing (LoRA's B starts at 0), so the first step's KL is 0; after two updates the
    policy has moved from the reference (the adapter switched off: KL 1.2e-3 at step 3, measured), and final/ is
    the adapter."""
    recipe = load_recipe(write_rl_run(tmp_path, tiny_model_dir, beta=0.5),
                         ["train.max_steps=3", "lora={r: 4, alpha: 8, dropout: 0.1}", "train.lr=0.05"])
    train(recipe)
    kl = [json.loads(line)["kl"] for line in recipe.run.metrics.read_text().splitlines()[:3]]
    assert kl[0] == 0.0 and kl[2] > 1e-4
    assert (recipe.run.final / "adapter_config.json").is_file()
