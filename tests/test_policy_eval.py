"""`finetune eval` of a preference policy (issue 22): samples of the tuned model and its reference for the same
held-out prompts, the estimate of KL(tuned || reference) from the tuned model's samples, bits per byte of the
held-out prompt + chosen text, and the same figures from one process and from two.

Bounds: KL_ZERO and LOG_RATIO_ABSOLUTE are measured where they are used (see there)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import subprocess_env
from preference_pairs import separable_pairs, write_run
from transformers import AutoModelForCausalLM

from finetune.cli import main
from finetune.errors import UserError
from finetune.evaluation import Evaluator, baseline_model
from finetune.modeling import apply_lora, context_length, load_final, without_kv_cache
from finetune.prepare import prepare
from finetune.prepared import load_prepared_tokenizer
from finetune.recipe import Recipe, load_recipe, save_recipe

POLICY = ["eval.policy.prompts=6", "eval.policy.max_new_tokens=24", "eval.batch_size=4"]
# tuned == reference: the same weights through the same computation. Measured: 0.0 exactly (the LoRA's zero B adds
# exact zeros; the base scored twice is bitwise the same), at 1 and 2 threads. A float32 rounding difference between
# the two scorings would show as ~1e-6 per sample; 1e-9 catches any real difference.
KL_ZERO = 1e-9
# Per-sample log p_tuned - log p_ref, from eval (batched, right-padded, chunked, float64 sums of float32 log-probs)
# against each sample alone through plain transformers with a float64 log_softmax. Measured in the test below: up to
# 4.1e-6 (1 thread) and 4.7e-6 (2 threads) apart, log ratios of 0.6 to 5.2 nats over 26 to 60 tokens. 10x that:
LOG_RATIO_ABSOLUTE = 5e-5


def lora_run(tmp_path: Path, model_dir: Path, b_scale: float) -> Path:
    """A prepared DPO run whose final/ is a LoRA adapter over `model_dir` with B ~ N(0, b_scale) (0: B left at its
    zero initialisation, so the tuned model is the reference), saved as the train stage saves it."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "all"}
    path = write_run(tmp_path, model_dir, separable_pairs(60, seed=11), lora)
    recipe = load_recipe(path)
    prepare(recipe)
    torch.manual_seed(2)
    model, _ = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), recipe.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, b_scale)
    model.save_pretrained(recipe.run.final)
    load_prepared_tokenizer(recipe).save_pretrained(recipe.run.final)
    save_recipe(recipe, recipe.run.final / "recipe.yaml")
    return path


def run_eval(path: Path, *overrides: str) -> dict:
    assert main(["eval", str(path), *POLICY, *overrides]) == 0
    return json.loads(load_recipe(path).run.eval_results.read_text())


@pytest.mark.usefixtures("one_thread")
def test_kl_is_zero_and_samples_agree_when_tuned_is_the_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = lora_run(tmp_path, tiny_model_dir, b_scale=0.0)
    results = run_eval(path)
    assert results["kl_samples"] == len(results["policy_samples"]) == 6
    assert abs(results["kl_to_reference"]) <= KL_ZERO and results["kl_to_reference_stderr"] <= KL_ZERO
    # the same seed per prompt: the same model draws the same completions
    assert all(s["tuned"] == s["reference"] for s in results["policy_samples"])
    assert [s["seed"] for s in results["policy_samples"]] == [42 + i for i in range(6)]
    assert len({s["tuned"] for s in results["policy_samples"]}) > 1  # sampled, not one greedy answer
    held_out, base = results["heldout_text"], results["baseline"]["heldout_text"]
    assert held_out["bits_per_byte"] == base["bits_per_byte"] and held_out["tokens"] > results["pairs"]
    report = load_recipe(path).run.report.read_text()
    assert "| # | prompt | reference sample | tuned sample |" in report and "KL(tuned || reference) = 0.0000" in report
    assert "Held-out text (drift guard)" in report
    rows = report.split("| # | prompt | reference sample | tuned sample |")[1].split("\n\n")[0].splitlines()[2:]
    assert len(rows) == 6 and all(len(re.split(r"(?<!\\)\|", row)) == 6 for row in rows)  # text escaped: 4 cells
    # a full fine-tune scored against its base: final/ is the base itself
    full = load_recipe(path, ["lora=null"])
    full.run.final.rename(full.run.root / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.save_pretrained(full.run.final)
    load_prepared_tokenizer(full).save_pretrained(full.run.final)
    results = run_eval(path, "lora=null")
    assert abs(results["kl_to_reference"]) <= KL_ZERO
    assert results["baseline"]["model"] == str(tiny_model_dir)


def test_sampling_settings_are_checked(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = lora_run(tmp_path, tiny_model_dir, b_scale=0.0)
    for override, message in (("eval.policy.prompts=1025", "'eval.policy.prompts' must be in [0, 1024], got 1025"),
                              ("eval.policy.max_new_tokens=0",
                               "'eval.policy.max_new_tokens' must be in [1, 1024], got 0")):
        with pytest.raises(UserError, match=re.escape(message)):
            load_recipe(path, [override])
    assert main(["eval", str(path), "eval.policy.max_new_tokens=128"]) == 2  # the tiny model's whole context
    assert "'eval.policy.max_new_tokens' (128) leaves no room for the prompt" in capsys.readouterr().err


@torch.no_grad()
def direct_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt): one unpadded sequence through the model, float64 log_softmax."""
    logprobs = model(input_ids=torch.tensor([prompt + completion]), use_cache=False).logits[0].double().log_softmax(-1)
    return sum(logprobs[len(prompt) + k - 1, token].item() for k, token in enumerate(completion))


@pytest.mark.usefixtures("one_thread")
def test_kl_estimate_equals_a_direct_computation_on_the_same_samples(tmp_path: Path, recital_base: Path) -> None:
    """Eval's sampling and scoring, run in this process on a LoRA policy that differs from its base (one trained to
    recite the word list and stop, so samples end with EOS), against a plain per-sample computation on the same
    samples with an independently loaded base."""
    recipe: Recipe = load_recipe(lora_run(tmp_path, recital_base, b_scale=0.05),
                                 [*POLICY, "eval.policy.max_new_tokens=60"])
    tokenizer = load_prepared_tokenizer(recipe)
    tuned = without_kv_cache(load_final(recipe.run.final)).eval()
    evaluator = Evaluator(recipe, tokenizer, Accelerator(cpu=True), context_length(tuned))
    evaluator.evaluate(tuned, baseline=False)
    with baseline_model(tuned, recipe, tokenizer, torch.device("cpu")) as (reference, _):
        evaluator.evaluate(reference, baseline=True)
    figures = evaluator.policy_figures()
    base = AutoModelForCausalLM.from_pretrained(recital_base).eval()
    direct = []
    for (index, completion, _), entry in zip(evaluator._tuned_samples, figures["policy_samples"]):
        assert entry["index"] == index and entry["tuned_tokens"] == len(completion.ids)
        direct.append(direct_logp(tuned, completion.prompt_ids, completion.ids)
                      - direct_logp(base, completion.prompt_ids, completion.ids))
        assert entry["log_ratio"] == pytest.approx(direct[-1], abs=LOG_RATIO_ABSOLUTE)
    assert figures["kl_to_reference"] == pytest.approx(sum(direct) / len(direct), abs=LOG_RATIO_ABSOLUTE)
    assert figures["kl_to_reference"] > 1  # the adapter moves the model: the comparison is not at 0
    lengths = {len(c.ids) for _, c, _ in evaluator._tuned_samples if c.ids[-1] == tokenizer.eos_token_id}
    assert lengths and max(lengths) < 60  # samples that ended are scored with their EOS


@pytest.mark.slow
def test_two_processes_draw_and_score_the_same_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = lora_run(tmp_path, tiny_model_dir, b_scale=0.3)
    command = ["-m", "finetune", "eval", str(path), *POLICY, "eval.policy.prompts=10", "eval.batch_size=3"]
    figures = []
    for launch in ([sys.executable], [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                                      "--num_processes", "2"]):
        done = subprocess.run([*launch, *command], env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        figures.append(json.loads(load_recipe(path).run.eval_results.read_text()))
    one, two = figures
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["policy_samples"] == one["policy_samples"] and len(one["policy_samples"]) == 10
    for key in ("kl_to_reference", "kl_to_reference_stderr"):
        assert two[key] == one[key]
    assert two["heldout_text"] == {**one["heldout_text"], "seconds": two["heldout_text"]["seconds"],
                                   "tokens_per_second": two["heldout_text"]["tokens_per_second"]}
