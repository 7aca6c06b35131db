"""`finetune eval RECIPE`: the tuned model (the run's final/) against its base on the validation split.

Figures: loss (token-weighted mean NLL over target tokens only), perplexity, bits per byte, for the validation
split and each of `eval.files`; accuracy, macro-F1 and the confusion matrix for classification (label scoring);
exact match and BLEU of greedy generations for instruction and chat data; held-out pair accuracy and margin for
preference pairs, and for a preference policy its samples against its reference's, the KL estimate between them and
bits per byte of held-out text (finetune/policy_eval.py); for rated completions (feedback data) how the model scores
desirable against undesirable ones. Under `accelerate launch` the work is sharded across processes; NLL sums and
counts are reduced, predictions gathered, before anything is divided, so the figures depend neither on the number
of processes nor on the batch size.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from finetune import harness, report
from finetune.collate import PackedCollator, PairCollator
from finetune.data import read_utf8
from finetune.distributed import is_main_process, process_group, same_prepared_data, use_cpu
from finetune.errors import UserError, path_problem
from finetune.eval_results import weight_files_digest, write_eval_results
from finetune.formats import DataFormat, Segment, data_format, encode_segments
from finetune.generation.engine import Engine, Request
from finetune.generation.params import SamplingParams
from finetune.generation.window import fit_prompt, reply_reserve
from finetune.metrics import (NllSums, batch_sums, classification_figures, generation_figures, label_loglikelihoods,
                              token_byte_lengths)
from finetune.loss import sequence_logps
from finetune.modeling import DTYPES, context_length, load_base_model, load_final, without_kv_cache
from finetune.objectives import PairLogps, needs_reference, preference_margins
from finetune.packing import IGNORE, best_fit_decreasing
from finetune.policy_eval import Completion, completion_logps, is_policy, kl_figures, sample
from finetune.prepare import ensure_prepared
from finetune.prepared import load_prepared, load_prepared_tokenizer, load_records
from finetune.recipe import Recipe
from finetune.reward import sequence_rewards
from finetune.rl.rewards import Completions, completions_of, load_rewards, reward_table
from finetune.rl.trainer import decode, rollout_seed
from finetune.run_folder import IDENTITY_FILE

DEMO_SEPARATOR = "\n\n"
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")  # contextual calibration inputs of Zhao et al. 2021


def evaluate(recipe: Recipe, folder: Path | None = None) -> dict:
    """Score the model in `folder` (default: the run's final/) and, unless eval.baseline is off, its base; write
    eval.json and report.md. Returns the figures."""
    with process_group() as state:
        accelerator = Accelerator(cpu=use_cpu())
        started = time.perf_counter()
        tasks = harness.check(recipe) if recipe.eval.harness else None
        manifest = ensure_prepared(recipe, state.num_processes)
        same_prepared_data(state, manifest["fingerprint"])
        folder = folder or recipe.run.final
        if is_main_process():
            recipe.run.claim(recipe.run.eval_results, recipe.run.report)
        tokenizer = load_prepared_tokenizer(recipe)
        tuned = load_model(folder, recipe, tokenizer, accelerator.device, manifest["fingerprint"])
        digest = weight_files_digest(folder) if is_main_process() else None  # the weights as loaded; one reader
        evaluator = Evaluator(recipe, tokenizer, accelerator, context_length(tuned))

        def figures(model: torch.nn.Module, baseline: bool) -> dict:
            out = evaluator.evaluate(model, baseline)
            if tasks is not None and is_main_process():  # the harness runs its model in one process
                out["harness"] = harness.evaluate(model, tokenizer, recipe.eval.harness, tasks,
                                                  recipe.eval.batch_size)
            accelerator.wait_for_everyone()
            return out

        results = {"model": str(folder), "weights_digest": digest, "format": recipe.data.format,
                   **figures(tuned, baseline=False)}
        if recipe.eval.baseline:
            with baseline_model(tuned, recipe, tokenizer, accelerator.device) as (base, description):
                results["baseline"] = {"model": description, **figures(base, baseline=True)}
            if evaluator.margins and needs_reference(recipe.train.objective):
                results.update(evaluator.reward_figures())
            if evaluator.completions:
                results.update(evaluator.feedback_reward_figures())
            if evaluator.rollout_rewards:
                results.update(evaluator.rollout_comparison())
            if evaluator.policy_samples:
                results.update(evaluator.policy_figures())
                if evaluator.heldout_rewards:
                    judged = evaluator.judge_policy_samples()
                    results["heldout_reward_mean"] = judged["tuned"]
                    results["baseline"]["heldout_reward_mean"] = judged["reference"]
        results["processes"] = accelerator.num_processes
        results["wall_seconds"] = round(time.perf_counter() - started, 3)
        if is_main_process():
            write_eval_results(recipe.run.eval_results, results)
            report.write_report(recipe.run.report, recipe, results)
            print(report.summary_table(results))
            print(f"eval: wrote {recipe.run.eval_results} and {recipe.run.report}")
        return results


def load_model(folder: Path, recipe: Recipe, tokenizer, device: torch.device, prepared: str) -> torch.nn.Module:
    """The model to evaluate, refused when it was not trained with the prepared data's tokenizer: a folder with
    tokenizer files must hold the same vocabulary; one without (a Trainer checkpoint) must belong to a run
    recorded as trained on this prepared data (`prepared` is its fingerprint)."""
    model = load_final(folder, DTYPES[recipe.model.dtype])
    if not (folder / "tokenizer_config.json").is_file():
        record = folder.parent / IDENTITY_FILE
        trained_on = json.loads(record.read_text()).get("prepared data") if record.is_file() else None
        if trained_on != prepared:
            raise UserError(f"{folder} holds no tokenizer, and no {IDENTITY_FILE} beside it shows it was trained on "
                            f"{recipe.run.prepared} as it is now: evaluate a final/ folder, or a checkpoint of this "
                            "run trained since the data was last prepared")
    if (folder / "tokenizer_config.json").is_file():
        if AutoTokenizer.from_pretrained(str(folder)).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{folder}: its tokenizer differs from the prepared data's "
                            f"({recipe.run.prepared}/tokenizer): the data or tokenizer settings changed after "
                            "training; restore them or train again")
    return without_kv_cache(model).to(device).eval()


@contextmanager
def baseline_model(tuned: torch.nn.Module, recipe: Recipe, tokenizer, device: torch.device) -> Iterator[tuple]:
    """The base to compare with: the adapter disabled, or the recipe's base model (a fresh `model.init`)."""
    if isinstance(tuned, PeftModel):
        with tuned.disable_adapter():
            yield tuned, f"{tuned.peft_config['default'].base_model_name_or_path} (adapter disabled)"
        return
    base = without_kv_cache(load_base_model(recipe, tokenizer)).to(device).eval()
    if recipe.model.init is not None:
        yield base, f"untrained initialisation (model.init, seed {recipe.train.seed})"
    else:
        yield base, recipe.model.base


def sliding_windows(ids: list[int], block: int, stride: int) -> list[dict[str, list[int]]]:
    """Hugging Face's fixed-length-model perplexity: windows of `block` tokens starting every `stride` tokens;
    each token is scored once, in the first window that holds it after its first position, so it sees up to
    `block - stride` tokens of context (with stride = block the first token of each window goes unscored)."""
    rows, scored_to = [], 1
    for begin in range(0, len(ids), stride):
        end = min(begin + block, len(ids))
        window = ids[begin:end]
        first = max(scored_to - begin, 1)
        rows.append({"input_ids": window, "labels": [IGNORE] * first + window[first:],
                     "position_ids": list(range(len(window)))})
        scored_to = end
        if end == len(ids):
            break
    return rows


def document_windows(docs: list[list[int]], block: int, stride: int) -> list[dict[str, list[int]]]:
    """Sliding windows within each document (as in training, no token sees another document), bin-packed several
    to a row; positions restart at each window, so packed windows do not attend to each other."""
    windows = [w for doc in docs if len(doc) > 1 for w in sliding_windows(doc, block, stride)]
    bins = best_fit_decreasing([len(w["input_ids"]) for w in windows], block)
    return [{key: [t for i in members for t in windows[i][key]] for key in ("input_ids", "labels", "position_ids")}
            for members in bins]


class RowsView(Sequence):
    """The first `length` rows of a prepared split, read when indexed."""

    def __init__(self, rows: Sequence[dict], length: int) -> None:
        self.rows, self.length = rows, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.rows[index]


def draw_shots(train: list[dict], evaluated: list[dict], k: int, seed: int) -> list[dict]:
    """`k` demonstrations from the train records, balanced over labels, drawn with `seed`. A train record whose
    text also occurs among the evaluated records is never used."""
    held_out = {record["text"].strip() for record in evaluated}
    pools: dict[int, list[dict]] = {}
    for record in train:
        if record["text"].strip() not in held_out:
            pools.setdefault(record["label"], []).append(record)
    rng = random.Random(seed)
    drawn = [rng.sample(pool, min(k, len(pool))) for _, pool in sorted(pools.items())]
    demos = [pool[i] for i in range(k) for pool in drawn if i < len(pool)][:k]
    if len(demos) < k:
        raise UserError(f"eval.shots = {k}, but the train split has only {len(demos)} usable examples")
    rng.shuffle(demos)
    return demos


def demo_segments(demos: list[dict], fmt: DataFormat) -> list[Segment]:
    """Demonstrations rendered as in training (prompt + label words), each followed by a blank line."""
    out: list[Segment] = []
    for demo in demos:
        out += [(text, False) for text, _ in fmt.segments(demo)] + [(DEMO_SEPARATOR, False)]
    return out


class Evaluator:
    """Everything that is the same for the tuned and the base model: data, windows, labels, prompts."""

    def __init__(self, recipe: Recipe, tokenizer, accelerator: Accelerator, max_context: int) -> None:
        self.recipe, self.tokenizer, self.accelerator = recipe, tokenizer, accelerator
        self.cfg = recipe.eval
        self.format = data_format(recipe.data)
        self.max_context = max_context
        self.block = min(recipe.data.block_size, max_context)
        self._check_settings()
        self.collate = PackedCollator(tokenizer.pad_token_id)
        self.byte_lengths = torch.as_tensor(token_byte_lengths(tokenizer), device=accelerator.device)
        self.lm_sets = {"validation": self._validation_rows()}
        for path in self.cfg.files:
            self.lm_sets[path] = self._windows([file_tokens(path, tokenizer)], self.cfg.stride or self.block)
        self.records = self._records() if "validation" in self.format.record_splits else []
        self.margins: dict[str, torch.Tensor] = {}  # role -> per-pair margins (paired formats)
        self.completions: dict[str, torch.Tensor] = {}  # role -> per completion (log-prob, tokens, desirable)
        self.policy = is_policy(recipe.train.objective)
        # a policy's drift guard: eval.files when given, else the validation pairs' prompt + chosen text
        self.heldout_text = self._heldout_text() if self.policy and not self.cfg.files else None
        self._tuned_samples: list[tuple[int, Completion, float]] = []  # this process's: (prompt index, sample, logp)
        self.policy_samples: list[dict] = []  # all processes', after the reference was scored
        self._tuned_rollouts: dict[int, tuple[Completion, float]] = {}  # reward RL, this process's: (sample, logp)
        self.rollout_rewards: dict[str, dict[int, tuple]] = {}  # role -> prompt index -> (reward, held-out reward)
        self.rollout_kl: list[float] = []  # all processes' log p_tuned - log p_ref of the tuned completions
        full = recipe.rl.reward_text == "full"
        if self.format.prompts_only:
            self.rewards = load_rewards(recipe.rl.rewards, full, accelerator.device)
        self.heldout_rewards = load_rewards(recipe.eval.rewards, full, accelerator.device)

    def _check_settings(self) -> None:
        cfg, where = self.cfg, self.recipe.source
        if cfg.stride is not None and cfg.stride > self.block:  # 1..data.block_size was checked at load
            raise UserError(f"{where}: 'eval.stride' ({cfg.stride}) is above the model's {self.max_context}-token "
                            "context")
        if self.format.has_reference and cfg.generate_samples and \
                cfg.max_new_tokens >= self.max_context:
            raise UserError(f"{where}: 'eval.max_new_tokens' ({cfg.max_new_tokens}) leaves no room for the prompt "
                            f"in the model's {self.max_context}-token context")
        if is_policy(self.recipe.train.objective) and cfg.policy.prompts and \
                cfg.policy.max_new_tokens >= self.max_context:
            raise UserError(f"{where}: 'eval.policy.max_new_tokens' ({cfg.policy.max_new_tokens}) leaves no room for "
                            f"the prompt in the model's {self.max_context}-token context")

    def _validation_rows(self) -> tuple[Sequence[dict], str]:
        prepared = load_prepared(self.recipe, "validation")
        limit = self.cfg.max_examples
        if self.format.every_token_target and self.cfg.stride:
            return self._windows([doc.tolist() for doc in islice(prepared.documents(), limit)], self.cfg.stride)
        return RowsView(prepared, min(len(prepared), limit or len(prepared))), "prepared rows (target tokens)"

    def _records(self) -> list[dict]:
        return load_records(self.recipe, "validation")[:self.cfg.max_examples]

    def _heldout_text(self) -> tuple[list[dict], str]:
        """What the policy should still write well: prompt + chosen response of each validation pair, or prompt +
        completion of each desirable validation completion (feedback data)."""
        liked = [record for record in self.records if record.get("label", True)]
        docs = self._encode([self.format.segments(record) for record in liked])
        rows, method = self._windows(docs, self.cfg.stride or self.block)
        what = "desirable completion" if self.format.unpaired else "pair's chosen response"
        return rows, f"prompt + each validation {what}, every token scored; {method}"

    def _windows(self, docs: list[list[int]], stride: int) -> tuple[list[dict], str]:
        rows = document_windows(docs, self.block, stride)[:self.cfg.max_examples]
        return rows, f"sliding window within documents: block {self.block}, stride {stride}"

    def evaluate(self, model: torch.nn.Module, baseline: bool) -> dict:
        role = "base" if baseline else "tuned"
        rows, method = self.lm_sets["validation"]
        if self.recipe.train.objective == "reward":  # a scalar head, no next-token distribution
            return {"method": "held-out pairs, each sequence's reward at its last token",
                    **self.pair_figures(model, rows, role)}
        if self.format.prompts_only:  # prompts have no targets: the figures are the rewards of sampled completions
            out = self.rollout_figures(model, role)
        else:
            out = self.lm_figures(model, rows, method, f"{role}: validation")
        if self.cfg.files:
            out["files"] = {path: self.lm_figures(model, *self.lm_sets[path], f"{role}: {Path(path).name}")
                            for path in self.cfg.files}
        if self.format.paired:
            out.update(self.pair_figures(model, rows, role))
        if self.format.unpaired:
            out.update(self.feedback_figures(model, rows, role))
        if self.heldout_text is not None:
            out["heldout_text"] = self.lm_figures(model, *self.heldout_text, f"{role}: held-out text")
        if self.policy and self.cfg.baseline and self.cfg.policy.prompts:
            self.sample_policy(model, baseline)
        if self.format.label_words():
            out.update(self.classify(model, self.cfg.shots if baseline else 0, self.cfg.calibrate and baseline, role))
        elif self.format.has_reference and self.cfg.generate_samples:
            out.update(self.generate(model, role))
        return out

    def _mine(self, items: list) -> list:
        return items[self.accelerator.process_index::self.accelerator.num_processes]

    def _batches(self, items: list, desc: str) -> Iterator[list]:
        size = self.cfg.batch_size
        with tqdm(total=len(items), desc=desc, disable=not self.accelerator.is_local_main_process) as bar:
            for start in range(0, len(items), size):
                yield items[start:start + size]
                bar.update(len(items[start:start + size]))

    @torch.inference_mode()
    def lm_figures(self, model: torch.nn.Module, rows: Sequence[dict], method: str, desc: str) -> dict:
        started = time.perf_counter()
        sums, input_tokens = NllSums(), 0
        device = self.accelerator.device
        for indices in self._batches(self._mine(range(len(rows))), desc):
            batch = [rows[i] for i in indices]
            input_tokens += sum(len(row["input_ids"]) for row in batch)
            sums.add(batch_sums(model, {k: v.to(device) for k, v in self.collate(batch).items()}, self.byte_lengths,
                                self.recipe.train.loss_chunk))
        reduced = self.accelerator.reduce(torch.cat([sums.as_tensor(device), torch.tensor(
            [input_tokens], dtype=torch.float64, device=device)]), "sum")
        total = NllSums.from_tensor(reduced[:-1])
        seconds = time.perf_counter() - started
        return {**total.figures(), "method": method, "input_tokens": round(reduced[-1].item()),
                "seconds": round(seconds, 3), "tokens_per_second": round(total.tokens / seconds, 1)}

    @torch.inference_mode()
    def pair_figures(self, model: torch.nn.Module, rows: Sequence[dict], role: str) -> dict:
        """Held-out preference pairs: pair_accuracy, the share the model itself prefers the chosen response of
        (objectives.preference_margins; a reward model's reward difference), and pair_margin, the mean margin,
        over all pairs of the split."""
        collate, device, mine = PairCollator(self.tokenizer.pad_token_id), self.accelerator.device, []
        for indices in self._batches(self._mine(range(len(rows))), f"{role}: pairs"):
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in indices]).items()}
            if self.recipe.train.objective == "reward":
                rewards = sequence_rewards(model, batch)
                mine.append((rewards[0::2] - rewards[1::2]).double().cpu())
                continue
            logps = PairLogps.from_sequences(*sequence_logps(model, batch, self.recipe.train.loss_chunk))
            mine.append(preference_margins(self.recipe.train.objective, logps).double().cpu())
        margins = torch.cat(gather_object([torch.cat(mine) if mine else torch.zeros(0, dtype=torch.float64)]))
        self.margins[role] = margins
        return {"pair_accuracy": (margins > 0).double().mean().item(), "pair_margin": margins.mean().item(),
                "pairs": len(margins)}

    def rollout_figures(self, model: torch.nn.Module, role: str) -> dict:
        """Reward RL: one completion per validation prompt, sampled as in training (rl.temperature, at most
        rl.max_completion_tokens) with a seed per prompt from eval.seed, the same for the tuned and the base
        model; reward_mean under the training rewards, heldout_reward_mean under eval.rewards (training never saw
        them: a gap between the two shows reward hacking), the completions' mean length in tokens and distinct_2.
        With a baseline, the tuned model's completions are also scored by both models for rollout_comparison."""
        rl, eos = self.recipe.rl, self.tokenizer.eos_token_id
        params = SamplingParams(max_new_tokens=rl.max_completion_tokens, temperature=rl.temperature, top_p=1.0,
                                top_k=0, repetition_penalty=1.0, stop=())
        reserve = reply_reserve(self.max_context, rl.max_completion_tokens)
        prompts = self._encode([self.format.prompt_segments(record) for record in self.records])
        mine, log_ratios = [], []
        for batch in tqdm(self._whole_batches(list(enumerate(prompts))), desc=f"{role}: completions",
                          disable=not self.accelerator.is_local_main_process):
            requests = [Request(fit_prompt(ids, self.max_context, reserve), replace(params, seed=rollout_seed(
                self.cfg.seed, 0, i, 0))) for i, ids in batch]
            Engine(model, {eos}, partial(decode, self.tokenizer)).run(requests)
            samples = [Completion(r.prompt_ids, r.token_ids + ([eos] if r.finish_reason == "stop" else []), r.text)
                       for r in requests]
            if self.cfg.baseline:
                log_ratios += self._rollout_log_ratios(model, role, [i for i, _ in batch], samples)
            completions = completions_of([self.records[i] for i, _ in batch], [r.text for r in requests],
                                         (decode(self.tokenizer, r.prompt_ids) for r in requests))
            totals = [reward_table(rewards, completions)[1].tolist() if rewards else [None] * len(batch)
                      for rewards in (self.rewards, self.heldout_rewards)]
            mine += [(i, r.text, len(sample.ids), *values, r.token_ids)
                     for (i, _), r, sample, *values in zip(batch, requests, samples, *totals)]
        rows = sorted(gather_object(mine))
        self.rollout_rewards[role] = {row[0]: row[3:5] for row in rows}
        if role == "base":
            self.rollout_kl = gather_object(log_ratios)

        def mean(values: list) -> float | None:
            kept = [v for v in values if v is not None and v == v]  # NaN: no reward had an opinion
            return sum(kept) / len(kept) if kept else None

        figures = {"method": f"one sampled completion per validation prompt (seeds from eval.seed {self.cfg.seed})",
                   "completions": len(rows), "reward_mean": mean([row[3] for row in rows]),
                   "completion_length_mean": mean([row[2] for row in rows]),
                   "distinct_2": distinct_bigrams([row[5] for row in rows])}
        if self.heldout_rewards:
            figures["heldout_reward_mean"] = mean([row[4] for row in rows])
        figures["reward_samples"] = [{"prompt": decode(self.tokenizer, prompts[row[0]]), "completion": row[1],
                                      "reward": row[3] if row[3] == row[3] else None}  # NaN: no opinion
                                     for row in rows[:4]]
        return figures

    def _rollout_log_ratios(self, model: torch.nn.Module, role: str, indices: list[int],
                            samples: list[Completion]) -> list[float]:
        """The tuned model (first) keeps its samples with their log-probabilities; the reference (then) scores the
        tuned model's samples of the same prompts: log p_tuned - log p_ref per sample."""
        pad, chunk = self.tokenizer.pad_token_id, self.recipe.train.loss_chunk
        if role == "tuned":
            self._tuned_rollouts.update(zip(indices, zip(samples, completion_logps(model, samples, pad, chunk))))
            return []
        tuned = [self._tuned_rollouts[i] for i in indices]
        reference = completion_logps(model, [sample for sample, _ in tuned], pad, chunk)
        return [logp - ref for (_, logp), ref in zip(tuned, reference)]

    def rollout_comparison(self) -> dict:
        """Reward RL, the tuned model against its reference on the validation prompts: win_rate, the share of prompts
        whose tuned completion the training rewards score above the reference's completion of the same prompt and
        seed (ties count half; prompts either side has no reward for are left out; win_rate_prompts counts the
        rest), heldout_win_rate and heldout_win_rate_prompts the same under eval.rewards, and the KL estimate
        from the tuned model's completions (policy_eval.kl_figures; sampled at rl.temperature, see README)."""
        tuned, base = self.rollout_rewards["tuned"], self.rollout_rewards["base"]
        out = {}
        for key, column in (("win_rate", 0), ("heldout_win_rate", 1)):
            if column and not self.heldout_rewards:
                continue
            pairs = [(tuned[i][column], base[i][column]) for i in tuned]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None and a == a and b == b]
            wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
            out.update({key: wins / len(pairs) if pairs else None, f"{key}_prompts": len(pairs)})
        return {**out, **(kl_figures(self.rollout_kl) if self.rollout_kl else {})}

    def reward_figures(self) -> dict:
        """The objective's implicit reward beta * (log p_tuned - log p_reference) on held-out pairs (what training
        logs as rewards/*): reward_accuracy, the share of pairs whose chosen response it rewards more, and
        reward_margin, the mean difference."""
        rewards = self.recipe.train.preference.beta * (self.margins["tuned"] - self.margins["base"])
        return {"reward_accuracy": (rewards > 0).double().mean().item(), "reward_margin": rewards.mean().item()}

    @torch.inference_mode()
    def feedback_figures(self, model: torch.nn.Module, rows: Sequence[dict], role: str) -> dict:
        """Held-out rated completions: the model's mean log-probability per completion token over the desirable
        ones (desirable_logp) and over the undesirable ones (undesirable_logp), and feedback_margin, the first minus
        the second: how much more likely the model finds what raters liked."""
        collate, device, mine = PairCollator(self.tokenizer.pad_token_id), self.accelerator.device, []
        for indices in self._batches(self._mine(range(len(rows))), f"{role}: completions"):
            batch = [rows[i] for i in indices]
            logps, counts = sequence_logps(model, {k: v.to(device) for k, v in collate(batch).items()},
                                           self.recipe.train.loss_chunk)
            desirable = torch.as_tensor([float(d) for row in batch for d in row["desirable"]], dtype=torch.float64)
            mine.append(torch.stack([logps.double().cpu(), counts.double().cpu(), desirable], dim=1))
        completions = torch.cat(gather_object([torch.cat(mine) if mine else torch.zeros(0, 3, dtype=torch.float64)]))
        self.completions[role] = completions
        logps, counts, desirable = completions.T
        per_token = {label: logps[desirable == value].sum().item() / max(counts[desirable == value].sum().item(), 1)
                     for label, value in (("desirable", 1), ("undesirable", 0))}
        return {"desirable_logp": per_token["desirable"], "undesirable_logp": per_token["undesirable"],
                "feedback_margin": per_token["desirable"] - per_token["undesirable"],
                "completions": len(completions), "desirable_completions": int(desirable.sum().item())}

    def feedback_reward_figures(self) -> dict:
        """The tuned model against the reference on held-out rated completions: desirable_favoured and
        undesirable_favoured, the shares of desirable and of undesirable completions it makes more likely than
        the reference does (KTO pushes the first up and the second down), and reward_margin, the mean implicit
        reward beta * (log p_tuned - log p_reference) of the desirable completions minus that of the undesirable
        ones."""
        tuned, base = self.completions["tuned"], self.completions["base"]
        rewards = self.recipe.train.preference.beta * (tuned[:, 0] - base[:, 0])
        desirable = tuned[:, 2] == 1
        favoured = rewards > 0
        return {"desirable_favoured": favoured[desirable].double().mean().item(),
                "undesirable_favoured": favoured[~desirable].double().mean().item(),
                "reward_margin": (rewards[desirable].mean() - rewards[~desirable].mean()).item()}

    def _policy_batches(self) -> list[list[tuple[int, list[int]]]]:
        """This process's batches of (index, fitted prompt ids)."""
        cfg = self.cfg.policy
        prompts = self._encode([self.format.prompt_segments(r) for r in self.records[:cfg.prompts]])
        return self._whole_batches([(i, fit_prompt(ids, self.max_context, cfg.max_new_tokens))
                                    for i, ids in enumerate(prompts)])

    def _whole_batches(self, items: list) -> list[list]:
        """This process's batches of `items`: whole batches of eval.batch_size dealt round-robin, so that a batch
        holds the same items for any number of processes (batched sampling and scoring give the same numbers)."""
        size = self.cfg.batch_size
        batches = [items[start:start + size] for start in range(0, len(items), size)]
        return batches[self.accelerator.process_index::self.accelerator.num_processes]

    def sample_policy(self, model: torch.nn.Module, reference: bool) -> None:
        """The tuned model (first): its samples and their log-probabilities. The reference (then): its own samples
        of the same prompts with the same seeds, and the log-probabilities of the tuned model's samples; the
        samples of all processes are then gathered into `policy_samples`."""
        cfg, pad, chunk = self.cfg.policy, self.tokenizer.pad_token_id, self.recipe.train.loss_chunk
        mine = []
        for batch in self._policy_batches():
            indices, prompts = [i for i, _ in batch], [ids for _, ids in batch]
            completions = sample(model, self.tokenizer, prompts, [self.cfg.seed + i for i in indices],
                                 cfg.max_new_tokens)
            if not reference:
                logps = completion_logps(model, completions, pad, chunk)
                self._tuned_samples += zip(indices, completions, logps)
                continue
            tuned = [entry for entry in self._tuned_samples if entry[0] in indices]
            reference_logps = completion_logps(model, [c for _, c, _ in tuned], pad, chunk)
            mine += [{"index": i, "seed": self.cfg.seed + i, "reference": ref.text, "tuned": c.text,
                      "tuned_tokens": len(c.ids), "log_ratio": logp - ref_logp}
                     for (i, c, logp), ref, ref_logp in zip(tuned, completions, reference_logps)]
        if reference:
            self.policy_samples = [{"prompt": self._prompt_text(self.records[entry["index"]]), **entry}
                                   for entry in sorted(gather_object(mine), key=lambda s: s["index"])]

    def policy_figures(self) -> dict:
        """The KL estimate from the tuned model's samples (policy_eval.kl_figures) and the samples of both."""
        return {**kl_figures([s["log_ratio"] for s in self.policy_samples]), "policy_samples": self.policy_samples}

    def judge_policy_samples(self) -> dict[str, float | None]:
        """eval.rewards on the policy samples: per side (tuned, reference) the mean held-out reward of its
        completions (None: no reward had an opinion); each sample also gets its two values."""
        records = [self.records[entry["index"]] for entry in self.policy_samples]
        means = {}
        for side in ("tuned", "reference"):
            batch = Completions(prompts=[r["prompt"] for r in records], columns=[{} for _ in records],
                                prompt_texts=[entry["prompt"] for entry in self.policy_samples],
                                texts=[entry[side] for entry in self.policy_samples])
            _, totals = reward_table(self.heldout_rewards, batch)
            for entry, value in zip(self.policy_samples, totals.tolist()):
                entry[f"{side}_heldout_reward"] = value if value == value else None  # NaN: no opinion
            judged = totals[~totals.isnan()]
            means[side] = judged.mean().item() if len(judged) else None
        return means

    def _encode(self, batch: list[list[Segment]]) -> list[list[int]]:
        return [ids for ids, _ in encode_segments(self.tokenizer, batch)]

    @torch.inference_mode()
    def _label_scores(self, model: torch.nn.Module, contexts: list[list[int]], label_ids: list[list[int]],
                      desc: str) -> torch.Tensor:
        reserve = max(len(ids) for ids in label_ids)
        mine = []
        for batch in self._batches(self._mine(list(enumerate(contexts))), desc):
            fitted = [fit_prompt(c, self.max_context, reserve) for _, c in batch]
            scores = label_loglikelihoods(model, fitted, label_ids, self.tokenizer.pad_token_id)
            mine += [(i, row) for (i, _), row in zip(batch, scores.tolist())]
        scores = torch.tensor([row for _, row in sorted(gather_object(mine))], dtype=torch.float64)
        if self.cfg.length_normalize:
            scores /= torch.tensor([len(ids) for ids in label_ids], dtype=torch.float64)
        return scores

    def classify(self, model: torch.nn.Module, shots: int, calibrate: bool, role: str) -> dict:
        fmt = self.format
        label_ids = self._encode([[(word, True)] for word in fmt.label_words()])
        demos = draw_shots(load_records(self.recipe, "train"), self.records, shots, self.cfg.seed) \
            if shots else []
        prefix = demo_segments(demos, fmt)
        started = time.perf_counter()
        contexts = self._encode([prefix + fmt.prompt_segments(record) for record in self.records])
        scores = self._label_scores(model, contexts, label_ids, f"{role}: label scoring")
        if calibrate:
            free = [prefix + fmt.user_prompt(text) for text in CONTENT_FREE_INPUTS]
            free_scores = self._label_scores(model, self._encode(free), label_ids, f"{role}: calibration")
            scores = scores.log_softmax(-1) - free_scores.softmax(-1).mean(0).log()
        predicted = scores.argmax(-1).tolist()
        seconds = time.perf_counter() - started
        figures = classification_figures([record["label"] for record in self.records], predicted, fmt.label_names())
        return {**figures, "shots": shots, "shot_texts": [demo["text"] for demo in demos], "calibrated": calibrate,
                "length_normalized": self.cfg.length_normalize,
                "examples_per_second": round(len(self.records) / seconds, 1)}

    def generate(self, model: torch.nn.Module, role: str) -> dict:
        records = self.records[:self.cfg.generate_samples]
        prompts = [self.format.prompt_segments(record) for record in records]
        reserve = self.cfg.max_new_tokens  # the whole budget: a reference answer may be as long
        mine = []
        for batch in self._batches(self._mine(list(enumerate(self._encode(prompts)))), f"{role}: generation"):
            fitted = [fit_prompt(ids, self.max_context, reserve) for _, ids in batch]
            texts = greedy(model, self.tokenizer, fitted, self.cfg.max_new_tokens)
            mine += [(i, text) for (i, _), text in zip(batch, texts)]
        outputs = [text for _, text in sorted(gather_object(mine))]
        references = [self.format.reference(record) for record in records]
        samples = [{"prompt": self._prompt_text(record), "reference": ref, "output": out}
                   for record, ref, out in zip(records, references, outputs)]
        return {**generation_figures(outputs, references), "generations": samples}

    def _prompt_text(self, record: dict) -> str:
        """A record's prompt as text (the end-of-text token written out)."""
        eos = self.tokenizer.eos_token
        return "".join(eos if text is None else text for text, _ in self.format.prompt_segments(record))


def greedy(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts (decoded together), cut at the end-of-text token."""
    engine = Engine(model, {tokenizer.eos_token_id}, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    requests = [Request(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)) for ids in prompts]
    engine.run(requests)
    return [request.text for request in requests]


def distinct_bigrams(completions: list[list[int]]) -> float | None:
    """distinct-2 (Li et al. 2016): distinct token bigrams over all bigrams of the completions (each its own
    sequence; EOS not counted); 1 when no bigram repeats, low for repetitive text. None without any bigram."""
    bigrams = [tuple(ids[k:k + 2]) for ids in completions for k in range(len(ids) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def file_tokens(path: str, tokenizer) -> list[int]:
    """An `eval.files` entry as one token stream (the whole file, as in WikiText perplexity)."""
    file = Path(path)
    if problem := path_problem(file):
        raise UserError(f"eval.files: {path}: {problem}")
    ids = tokenizer(read_utf8(file), add_special_tokens=False, split_special_tokens=True,
                    verbose=False)["input_ids"]
    if len(ids) < 2:
        raise UserError(f"eval.files: {path} has fewer than 2 tokens; nothing to score")
    return ids
