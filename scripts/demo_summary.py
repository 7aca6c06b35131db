"""Print the offline demo's summary: what was trained, the base-vs-tuned figures, where the outputs are."""

from __future__ import annotations

import json
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


if __name__ == "__main__":
    main()
