"""Helpers shared by the benchmarks: shared-data lookup, result recording, one side of a comparison run in a
process of its own (its arguments parsed and passed on alike)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"


def shared_or_skip(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        print(f"skip: ../shared/data/{relative} is absent")
        sys.exit(0)
    return path


def record(name: str, figures: dict) -> None:
    """Print the figures and append them to bench/results/<name>.jsonl."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
             "python": platform.python_version(), **figures}
    with (RESULTS / f"{name}.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    for key, value in figures.items():
        print(f"  {key}: {value}")


def side_in_subprocess(module: str, side: str, argv: list[str]) -> dict:
    """Run `python -m module --side side ARGV` (its own process: its own peak RSS); the JSON its last line prints."""
    command = [sys.executable, "-m", module, "--side", side, *argv]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{side} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def comparison_args(parser: argparse.ArgumentParser, sides: list[str], warmup: int) -> argparse.Namespace:
    """Parse a comparison's arguments with --threads (set here) and the --side / --out that `side_in_subprocess`
    passes a side's own process; --steps must exceed the `warmup` steps left out of the timing."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= warmup:
        parser.error(f"--steps must be above the {warmup} warm-up steps")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def side_argv(args: argparse.Namespace, keys: tuple[str, ...]) -> list[str]:
    """The arguments `keys` (and --threads when set) as a side's process gets them."""
    return [f"--{key}={getattr(args, key)}" for key in keys] + ([f"--threads={args.threads}"] if args.threads else [])
