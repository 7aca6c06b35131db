"""report.md for a run: what was trained, base against tuned, the loss curve and sample generations (or, for reward
RL, sampled completions with their rewards)."""

from __future__ import annotations

import html
from pathlib import Path

from finetune.plots import read_metrics
from finetune.recipe import Recipe
from finetune.sources import describe_spec

FIGURES = [("loss", "loss (nats/token)", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
           ("bits_per_byte", "bits per byte", "{:.4f}"), ("tokens", "scored tokens", "{:d}"),
           ("accuracy", "accuracy", "{:.2%}"), ("macro_f1", "macro-F1", "{:.4f}"),
           ("exact_match", "exact match", "{:.2%}"), ("bleu", "BLEU", "{:.2f}"),
           ("pair_accuracy", "pair accuracy", "{:.2%}"), ("pair_margin", "pair margin", "{:.4f}"),
           ("desirable_logp", "desirable completions (log-prob/token)", "{:.4f}"),
           ("undesirable_logp", "undesirable completions (log-prob/token)", "{:.4f}"),
           ("feedback_margin", "feedback margin (desirable - undesirable)", "{:.4f}"),
           ("reward_mean", "reward (training rewards)", "{:.4f}"), ("heldout_reward_mean", "held-out reward", "{:.4f}"),
           ("completion_length_mean", "completion tokens (mean)", "{:.1f}"), ("distinct_2", "distinct-2", "{:.4f}"),
           ("win_rate", "win rate against the base", "{:.2%}"),
           ("heldout_win_rate", "win rate against the base (held-out reward)", "{:.2%}")]


def _cell(figures: dict | None, key: str, form: str) -> str:
    value = (figures or {}).get(key)
    return "-" if value is None else form.format(value)


def _table(tuned: dict, base: dict | None) -> list[str]:
    lines = ["| figure | base | tuned |", "|---|---:|---:|"]
    for key, name, form in FIGURES:
        if key in tuned:
            lines.append(f"| {name} | {_cell(base, key, form)} | {_cell(tuned, key, form)} |")
    return lines


def _harness_cell(figures: dict | None, key: str) -> str:
    value = (figures or {}).get(key)
    if not isinstance(value, (int, float)):
        return "-"
    metric, _, filtering = key.partition(",")
    stderr = (figures or {}).get(f"{metric}_stderr,{filtering}")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")


def _harness_table(tuned: dict, base: dict | None) -> list[str]:
    """lm-evaluation-harness figures (`metric,filter` keys; stderr beside its figure)."""
    lines = ["| harness task | figure | base | tuned |", "|---|---|---:|---:|"]
    for task, figures in tuned.items():
        for key in figures:
            metric, _, filtering = key.partition(",")
            if not filtering or metric.endswith("_stderr") or not isinstance(figures[key], (int, float)):
                continue
            name = metric if filtering in ("", "none") else f"{metric} ({filtering})"
            lines.append(f"| {task} | {name} | {_harness_cell((base or {}).get(task), key)} | "
                         f"{_harness_cell(figures, key)} |")
    return lines


def _kl_line(results: dict) -> str:
    stderr = results["kl_to_reference_stderr"]
    return (f"KL(tuned || reference) = {results['kl_to_reference']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None
            else "") + f" nats (standard error; estimated from the tuned model's {results['kl_samples']} samples)")


def summary_table(results: dict) -> str:
    lines = _table(results, results.get("baseline"))
    if "kl_to_reference" in results:
        lines += ["", _kl_line(results)]
    if "harness" in results:
        lines += ["", *_harness_table(results["harness"], (results.get("baseline") or {}).get("harness"))]
    return "\n".join(lines)


def _recipe_summary(recipe: Recipe) -> list[str]:
    model = recipe.model.base or f"from scratch, GPT-2 config {recipe.model.init}"
    if recipe.lora is None:
        method = "full fine-tuning"
    else:
        method = f"LoRA r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {recipe.lora.targets}"
    train = recipe.train
    length = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs} epochs"
    return [f"- model: {model}", f"- method: {method}",
            f"- data: {recipe.data.format} from {describe_spec(recipe.data.train)} (validation: "
            f"{describe_spec(recipe.data.validation) or f'{recipe.data.validation_fraction:.0%} carved from train'}), "
            f"block size {recipe.data.block_size}",
            f"- training: {length}, lr {train.lr}, batch {train.batch_size} x {train.grad_accum} accumulation, "
            f"seed {train.seed}"]


def _confusion(figures: dict, title: str) -> list[str]:
    confusion = figures["confusion_matrix"]
    names = confusion["labels"]
    lines = [f"{title} (rows: true label, columns: predicted)", "", "| | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    lines += [f"| {name} | " + " | ".join(map(str, row)) + " |"
              for name, row in zip(names, confusion["rows_true_columns_predicted"])]
    return lines + [""]


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def table_cell(text: str) -> str:
    """Text as one markdown table cell: HTML special characters escaped, `|` escaped, lines joined with <br>."""
    escaped = html.escape(text.strip() or "(empty)", quote=False).replace("|", "\\|")
    return "<br>".join(escaped.splitlines())


def _policy_samples(results: dict) -> list[str]:
    """A policy's samples against its reference's, with the KL estimate drawn from them."""
    lines = ["## Samples: reference against tuned", "",
             f"{_kl_line(results)}. Both models sample each prompt with the same seed, at temperature 1 with no top-k "
             "or top-p.", "",
             "| # | prompt | reference sample | tuned sample |", "|---:|---|---|---|"]
    lines += [f"| {number} | {table_cell(s['prompt'])} | {table_cell(s['reference'])} | {table_cell(s['tuned'])} |"
              for number, s in enumerate(results["policy_samples"], 1)]
    return lines + [""]


def samples_table(samples: list[dict]) -> list[str]:
    """Completions sampled in training (reward RL's `samples`) as a markdown table with their rewards."""
    names = list(samples[0]["rewards"]) if samples else []
    extra = names if len(names) > 1 else []
    lines = [f"| step | prompt | completion | reward |{''.join(f' {name} |' for name in extra)}",
             f"|---:|---|---|---:|{'---:|' * len(extra)}"]
    return lines + [f"| {s['step']} | {table_cell(s['prompt'])} | {table_cell(s['completion'])} | {_reward(s)} |"
                    + "".join(f" {_reward({'reward': s['rewards'][name]})} |" for name in extra) for s in samples]


def _training_samples(metrics: Path) -> list[str]:
    """The first and the last table of completions sampled in training, when metrics.jsonl has them."""
    logged = [row["samples"] for row in read_metrics(metrics) if row.get("samples")] if metrics.is_file() else []
    if not logged:
        return []
    lines = ["## Completions sampled in training", "",
             "Sampled at the training temperature, scored by the training rewards (rl.sample_log_steps).", ""]
    return lines + samples_table(logged[0] + (logged[-1] if len(logged) > 1 else [])) + [""]


def write_report(path: Path, recipe: Recipe, results: dict) -> None:
    base = results.get("baseline")
    lines = [f"# {recipe.name}: evaluation", "", *_recipe_summary(recipe), "",
             "## Base against tuned", "", f"- tuned: `{results['model']}`",
             f"- base: {base['model'] if base else 'not evaluated (eval.baseline: false)'}",
             f"- validation: {results['method']}", "", *_table(results, base), ""]
    if base and base.get("shots"):
        lines += [f"The base model was prompted with {base['shots']} examples from the train split"
                  f"{' and contextual calibration' if base['calibrated'] else ''}; the tuned model zero-shot.", ""]
    if "harness" in results:
        lines += ["## lm-evaluation-harness", "", *_harness_table(results["harness"], (base or {}).get("harness")), ""]
    for file, figures in results.get("files", {}).items():
        base_figures = (base or {}).get("files", {}).get(file)
        lines += [f"### {file}", "", figures["method"], "", *_table(figures, base_figures), ""]
    if "heldout_text" in results:
        lines += ["### Held-out text (drift guard)", "", results["heldout_text"]["method"], "",
                  *_table(results["heldout_text"], (base or {}).get("heldout_text")), ""]
    if results.get("policy_samples"):
        lines += _policy_samples(results)
    if "confusion_matrix" in results:
        lines += ["## Confusion matrices", "", *_confusion(results, "Tuned")]
        lines += _confusion(base, "Base") if base else []
    lines += _training_samples(recipe.run.metrics)
    if (path.parent / "loss.png").is_file():
        lines += ["## Training curves", "", "![training curves](loss.png)", ""]
    if results.get("generations"):
        lines += ["## Sample generations (greedy)", ""]
        base_outputs = [g["output"] for g in (base or {}).get("generations", [])]
        for number, sample in enumerate(results["generations"], 1):
            lines += [f"### Sample {number}", "", "Prompt:", "", _quote(sample["prompt"]), "", "Reference:", "",
                      _quote(sample["reference"]), "", "Tuned:", "", _quote(sample["output"]), ""]
            if number <= len(base_outputs):
                lines += ["Base:", "", _quote(base_outputs[number - 1]), ""]
    if results.get("reward_samples"):  # reward RL: completions sampled with the same seed for both models
        lines += ["## Sample completions (sampled, the same seed per prompt for both models)", ""]
        base_samples = (base or {}).get("reward_samples", [])
        for number, sample in enumerate(results["reward_samples"], 1):
            lines += [f"### Sample {number}", "", "Prompt:", "", _quote(sample["prompt"]), "",
                      f"Tuned (reward {_reward(sample)}):", "", _quote(sample["completion"]), ""]
            if number <= len(base_samples):
                lines += [f"Base (reward {_reward(base_samples[number - 1])}):", "",
                          _quote(base_samples[number - 1]["completion"]), ""]
    path.write_text("\n".join(lines))


def _reward(sample: dict) -> str:
    return "no opinion" if sample["reward"] is None else f"{sample['reward']:.4g}"
