"""Trainer callbacks for the train stage: tokens/s, `metrics.jsonl`, a progress bar that shows both, and for resumed
runs, a stop when nothing is left to train and the learning rate of an extended schedule."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.optim.lr_scheduler import LambdaLR
from transformers import ProgressCallback, TrainerCallback

from finetune.distributed import is_main_process
from finetune.plots import read_metrics
from finetune.report import samples_table


class RunFinished(Exception):
    """A resumed run whose checkpoint already reached the last step (raised before any step)."""

    def __init__(self, step: int, max_steps: int) -> None:
        super().__init__(f"step {step} of {max_steps}")
        self.step, self.max_steps = step, max_steps


class StopWhenFinished(TrainerCallback):
    """Trainer runs one step before it checks for the end, so a run resumed from its last checkpoint would train a
    step past `max_steps`: stop it before it starts instead."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise RunFinished(state.global_step, state.max_steps)


class FollowNewSchedule(TrainerCallback):
    """A resumed run restores the optimizer's learning rate of its last step. When the run was extended (a higher
    max_steps after it finished), that is the end of the old schedule (0 for cosine and linear), and the first new
    step would be taken at it: set it from the new schedule, as its scheduler would have (a plain resume is
    unchanged: the two are the same number)."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0 or not isinstance(lr_scheduler, LambdaLR):
            return
        rates = [base * schedule(lr_scheduler.last_epoch)
                 for base, schedule in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        lr_scheduler._last_lr = rates


class Throughput(TrainerCallback):
    """Training tokens per second (input positions, padding included, all processes together).

    Only time inside training steps counts: the clock restarts after every log, evaluation and checkpoint.
    Every training log gets `tokens_per_s` over the interval since the previous one (later callbacks see it).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.mark = time.perf_counter()
        self.start_tokens = self.tokens = 0
        self.logged_seconds, self.logged_tokens = 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.seconds = self.logged_seconds = 0.0
        self.start_tokens = self.tokens = self.logged_tokens = state.num_input_tokens_seen
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds += now - self.mark
        self.mark = now
        self.tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            seconds = self.seconds - self.logged_seconds
            if seconds > 0:
                logs["tokens_per_s"] = (self.tokens - self.logged_tokens) / seconds
            self.logged_seconds, self.logged_tokens = self.seconds, self.tokens
        self.mark = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    @property
    def average(self) -> float:
        """Tokens per second over this session's training steps so far."""
        return (self.tokens - self.start_tokens) / self.seconds if self.seconds > 0 else 0.0


# the objectives' own metrics: the preference trainers' (preference_trainer.py, feedback_trainer.py), then reward
# RL's (rl/trainer.py)
OBJECTIVE_METRICS = ("rewards/", "logps/", "kl", "eval_rewards/", "eval_logps/", "eval_kl",
                     "reward", "frac_reward_zero_std", "entropy", "completions/", "samples")


class MetricsFile(TrainerCallback):
    """`metrics.jsonl`: one JSON object per training log (step, loss, lr, grad_norm, tokens/s) or evaluation
    (step, eval_loss), with the objectives' own figures (OBJECTIVE_METRICS). A resumed run keeps the lines up to its
    checkpoint's step and appends after them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not is_main_process():
            return
        kept = []
        if state.global_step > 0 and self.path.is_file():
            kept = [json.dumps(row) for row in read_metrics(self.path) if row["step"] <= state.global_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_main_process() or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            record.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                          tokens_per_s=round(logs.get("tokens_per_s", 0.0), 1), tokens=state.num_input_tokens_seen)
        elif "eval_loss" in logs:
            record["eval_loss"] = logs["eval_loss"]
        elif "train_runtime" in logs:  # the end of the run
            record.update(train_runtime=logs["train_runtime"], tokens=state.num_input_tokens_seen)
        else:
            return
        record.update({key: value for key, value in logs.items() if key.startswith(OBJECTIVE_METRICS)})
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class TokenProgress(ProgressCallback):
    """tqdm bar (steps, ETA) with tokens/s, and one readable line per log instead of a dict."""

    def __init__(self, throughput: Throughput) -> None:
        super().__init__()
        self.throughput = throughput

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(f"{self.throughput.average:,.0f} tok/s", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        if "train_loss" in logs:  # the summary Trainer logs at the end
            self.training_bar.write(f"done: step {state.global_step} after {logs['train_runtime']:.1f}s, "
                                    f"{self.throughput.average:,.0f} tok/s in training steps")
            return
        fields = {"loss": "loss {:.4f}", "eval_loss": "eval_loss {:.4f}", "learning_rate": "lr {:.3g}",
                  "grad_norm": "grad_norm {:.3g}", "tokens_per_s": "{:,.0f} tok/s"}
        parts = [fmt.format(logs[key]) for key, fmt in fields.items() if isinstance(logs.get(key), (int, float))]
        if parts:
            self.training_bar.write(f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts))
        if logs.get("samples"):
            self.training_bar.write("\n".join(["", *samples_table(logs["samples"]), ""]))

    def close(self) -> None:
        """End the bar of a run that stopped on an error, before the error is printed (otherwise tqdm redraws it
        below the error when it is garbage-collected)."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None
