"""`loss.png`: training and validation loss curves from a run's `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # the object API renders with Agg: no display, no global pyplot state


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line torn by a kill during its write (only ever the last) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """Draw `out` from `metrics`: the loss curves, and for reward RL the reward (mean +- std over the completions of
    each logging step) and the KL to the reference below them; returns None when there is nothing to draw."""
    metrics = Path(metrics)
    rows = read_metrics(metrics) if metrics.is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    validation = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    rewarded = [r for r in rows if r.get("reward") is not None and r.get("loss") is not None]
    if not train and not validation:
        return None
    fig = Figure(figsize=(7, 7 if rewarded else 4))
    ax = fig.add_subplot(2, 1, 1) if rewarded else fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if validation:
        ax.plot(*zip(*validation), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)" if not rewarded else "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewarded:
        _plot_reward(fig.add_subplot(2, 1, 2), rewarded)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)


def _plot_reward(ax, rows: list[dict]) -> None:
    steps = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    std = [r.get("reward_std", 0.0) for r in rows]
    ax.plot(steps, mean, label="reward", linewidth=1.2)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (mean, +- std)")
    ax.grid(alpha=0.3)
    if any("kl" in r for r in rows):
        kl = ax.twinx()
        kl.plot(steps, [r.get("kl", float("nan")) for r in rows], color="tab:red", linewidth=1, label="KL")
        kl.set_ylabel("KL to the reference (per token)", color="tab:red")
