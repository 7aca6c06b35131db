"""Print the offline demo's summary: what was trained, the base-vs-tuned figures, where the outputs are."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUTS = Path("outputs")


def figures(run: str) -> dict:
    path = OUTPUTS / run / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def line(label: str, base: float | None, tuned: float | None, fmt: str) -> str:
    show = lambda v: "-" if v is None else format(v, fmt)  # noqa: E731
    return f"  {label:<22}{show(base):>12}{show(tuned):>12}"


def main() -> None:
    tune = figures("demo-tune")
    base = tune.get("baseline", {})
    print("\n=== gpt2-finetune demo ===")
    print("1. pretrained a tiny GPT-2 from scratch on data/demo/reviews.txt      -> outputs/demo-pretrain/final")
    print("2. LoRA-tuned it to label reviews positive/negative                  -> outputs/demo-tune/final")
    print(f"\n  {'validation':<22}{'base':>12}{'tuned':>12}")
    print(line("accuracy", base.get("accuracy"), tune.get("accuracy"), ".1%"))
    print(line("macro-F1", base.get("macro_f1"), tune.get("macro_f1"), ".3f"))
    print(line("label loss (nats)", base.get("loss"), tune.get("loss"), ".3f"))
    print(f"  (base = the pretrained model with {base.get('shots', 0)}-shot prompts; tuned = zero-shot)")
    for run in ("demo-pretrain", "demo-tune"):
        for name in ("report.md", "loss.png", "metrics.jsonl"):
            path = OUTPUTS / run / name
            if path.exists():
                print(f"  {run}: {path}")
    pretrain = figures("demo-pretrain")
    print(f"\n  {'held-out reviews':<22}{'init':>12}{'pretrained':>12}")
    base_bpb = pretrain.get("baseline", {}).get("bits_per_byte")
    print(line("bits per byte", base_bpb, pretrain.get("bits_per_byte"), ".3f"))
    print(line("perplexity", pretrain.get("baseline", {}).get("perplexity"), pretrain.get("perplexity"), ".2f"))
    print("\nTry next:")
    print('  make generate RECIPE=recipes/demo-tune.yaml PROMPT="The kettle is sturdy and quiet. Honestly, it arrived '
          'a day early. Five stars."')
    print("  make serve RECIPE=recipes/demo-tune.yaml        # then POST http://127.0.0.1:8000/generate")
    print("  make eval RECIPE=recipes/demo-pretrain.yaml     # perplexity and bits per byte of the pretrained model")
    print("  make demo-preference                            # DPO: the review writer learns to write positive reviews")
    print("  make demo-reward                                # GRPO: the same, from the classifier's reward")


def kl_line(tuned: dict) -> None:
    if "kl_to_reference" in tuned:
        print(f"  KL(tuned || before) = {tuned['kl_to_reference']:.3f} "
              f"± {tuned.get('kl_to_reference_stderr') or float('nan'):.3f} nats per review")


def before_after(samples: list[tuple[str, str, str]]) -> None:
    """(prompt, the model's text before tuning, after) for a few held-out prompts sampled with the same seeds."""
    for prompt, before, after in samples:
        print(f"\n  prompt: {prompt}\n    before: {before.strip()}\n    after:  {after.strip()}")


def preference() -> None:
    dpo = figures("demo-dpo")
    base = dpo.get("baseline", {})
    print("\n=== gpt2-finetune demo: preference tuning ===")
    print("DPO on 800 pairs (a review's opening, a positive ending chosen over a negative one) -> outputs/demo-dpo")
    print(f"\n  {'held-out':<22}{'before':>12}{'after':>12}")
    print(line("positive reviews", base.get("heldout_reward_mean"), dpo.get("heldout_reward_mean"), ".1%"))
    print(line("pair accuracy", base.get("pair_accuracy"), dpo.get("pair_accuracy"), ".1%"))
    print(line("bits per byte", base.get("heldout_text", {}).get("bits_per_byte"),
               dpo.get("heldout_text", {}).get("bits_per_byte"), ".3f"))
    print(f"  positive reviews: demo-tune's probability of 'positive' for each of {dpo.get('kl_samples', 0)} reviews "
          "written from held-out openings (mean)")
    kl_line(dpo)
    before_after([(s["prompt"], s["reference"], s["tuned"]) for s in dpo.get("policy_samples", [])[:2]])
    print("\n  outputs/demo-dpo/report.md holds the samples of both; metrics.jsonl the rewards and margins per step")


def last_logged(run: str, key: str) -> float | None:
    path = OUTPUTS / run / "metrics.jsonl"
    rows = [json.loads(row) for row in path.read_text().splitlines()] if path.is_file() else []
    return next((row[key] for row in reversed(rows) if key in row), None)


def reward() -> None:
    grpo = figures("demo-grpo")
    base = grpo.get("baseline", {})
    print("\n=== gpt2-finetune demo: tuning with a reward ===")
    print("GRPO on 800 review openings, rewarded by demo-tune's probability of 'positive' -> outputs/demo-grpo")
    print(f"\n  {'held-out openings':<22}{'before':>12}{'after':>12}")
    print(line("reward (classifier)", base.get("reward_mean"), grpo.get("reward_mean"), ".1%"))
    print(line("held-out (word list)", base.get("heldout_reward_mean"), grpo.get("heldout_reward_mean"), ".1%"))
    print(line("review tokens", base.get("completion_length_mean"), grpo.get("completion_length_mean"), ".1f"))
    print(f"  reward: demo-tune's probability of 'positive' for each of {grpo.get('completions', 0)} reviews written "
          "from held-out openings (mean)\n  held-out: the share of praise among their praise and fault words "
          "(recipes/rewards/review_words.py, unseen in training)")
    if "win_rate" in grpo:
        print(f"  after beats before on {grpo['win_rate']:.1%} of the openings by the classifier, "
              f"{grpo.get('heldout_win_rate', float('nan')):.1%} by the word list (same seeds, ties half)")
    kl_line(grpo)
    kl = last_logged("demo-grpo", "kl")
    if kl is not None:
        print(f"  KL to the base at the last logged training step: {kl:.3f} nats per token")
    before_after([(tuned["prompt"], before["completion"], tuned["completion"])
                  for tuned, before in zip(grpo.get("reward_samples", []), base.get("reward_samples", []))][:3])
    print("\n  outputs/demo-grpo/report.md holds the samples of both; metrics.jsonl the rewards and KL per step")


if __name__ == "__main__":
    {"preference": preference, "reward": reward}.get(sys.argv[1] if sys.argv[1:] else "", main)()
