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
    """Draw `out` from `metrics`; returns None when there is nothing to draw."""
    metrics = Path(metrics)
    rows = read_metrics(metrics) if metrics.is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    validation = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not validation:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if validation:
        ax.plot(*zip(*validation), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)
