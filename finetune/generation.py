"""Generation: prompts built exactly as in training, batched sampling over one KV cache, per-request seeds,
stop strings and streamed text. `finetune generate`, `finetune chat` and the HTTP server share this decode loop.
"""

from __future__ import annotations

import functools
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from finetune import formats
from finetune.errors import UserError
from finetune.modeling import DTYPES, context_length, load_base_model, load_final
from finetune.tokenizer import load_tokenizer, tokenizer_source
from finetune.recipe import DataConfig, Recipe, recipe_from_dict
from finetune.run_folder import RECIPE_FILE

SEED_RANGE = 2**64
Message = dict[str, str]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        if self.max_new_tokens < 1:
            return f"max_new_tokens must be at least 1, got {self.max_new_tokens}"
        if self.temperature < 0:
            return f"temperature must be 0 (greedy) or more, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            return f"top_k must be 0 (off) or more, got {self.top_k}"
        if self.repetition_penalty <= 0:
            return f"repetition_penalty must be more than 0, got {self.repetition_penalty}"
        if any(not isinstance(s, str) or not s for s in self.stop):
            return f"stop must be a list of non-empty strings, got {list(self.stop)}"
        return None


@functools.lru_cache(maxsize=64)
def _processors(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if temperature > 0:
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(temperature)))
        if top_k > 0:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(float(top_p)))
    return chain


def _probabilities(scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax that survives extreme settings: with a temperature or repetition penalty tiny enough for scores to
    overflow, the +inf scores share the mass; a row with nothing left falls back to its most likely token."""
    scores = scores.nan_to_num(nan=float("-inf"))
    overflow = torch.isposinf(scores)
    scores = torch.where(overflow.any(-1, keepdim=True), torch.where(overflow, 0.0, float("-inf")), scores)
    empty = torch.isneginf(scores).all(-1)
    if empty.any():
        best = torch.nn.functional.one_hot(logits[empty].argmax(-1), scores.size(-1)).bool()
        scores[empty] = torch.where(best, 0.0, float("-inf"))
    return scores.softmax(-1)


@dataclass(eq=False)
class Request:
    """One sequence to generate. Callbacks run on the generating thread: `on_text` with each new piece of text
    that is final (never part of a stop string), `on_finish` once with the finished request."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    on_finish: Callable[[Request], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None
    cancelled: bool = False  # set from another thread to drop the request
    seed: int = 0
    _budget: int = 0
    _emitted: int = 0
    _rng: torch.Generator | None = None

    def _start(self, context: int, device: torch.device) -> bool:
        """Resolve the token budget and seed; False when the prompt leaves no room for a new token."""
        self.seed = secrets.randbits(63) if self.params.seed is None else self.params.seed % SEED_RANGE
        self._rng = torch.Generator(device=device).manual_seed(self.seed)
        self._budget = min(self.params.max_new_tokens, context - len(self.prompt_ids))
        if self._budget < 1:
            self._finish("length", "")
            return False
        return True

    def _accept(self, token: int, eos: int, decode: Callable[[list[int]], str]) -> bool:
        """Take one sampled token; True when the request is finished."""
        if self.cancelled:
            self.finish_reason = "cancelled"
            return True
        if token == eos:
            return self._finish("stop", decode(self.token_ids))
        self.token_ids.append(token)
        text = decode(self.token_ids)
        cuts = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if cuts:
            return self._finish("stop", text[: min(cuts)])
        if len(self.token_ids) >= self._budget:
            return self._finish("length", text)
        self._emit(text, _stable_end(text, self.params.stop))
        return False

    def _emit(self, text: str, end: int) -> None:
        if end > self._emitted:
            piece, self._emitted = text[self._emitted:end], end
            if self.on_text:
                self.on_text(piece)

    def _finish(self, reason: str, text: str) -> bool:
        self.text = text
        self._emit(text, len(text))
        self.finish_reason = reason
        if self.on_finish:
            self.on_finish(self)
        return True

    def fail(self, message: str) -> None:
        self.error, self.finish_reason = message, "error"
        if self.on_finish:
            self.on_finish(self)


def _stable_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be shown: not a trailing partial UTF-8 character, nor a tail that may start a stop."""
    end = len(text.rstrip("\ufffd"))
    for size in range(min(end, max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[end - size:end]) for s in stops):
            return end - size
    return end


def user_prompt_segments(text: str, data: DataConfig) -> list[formats.Segment]:
    """The generation prompt for one user text, with the recipe's template, as segments (see formats.py)."""
    if data.format == "text":
        return [(text, False)]
    if data.format == "chat":
        return formats.chat_segments([{"role": "user", "content": text}], data.chat, add_generation_prompt=True)
    if data.format == "instruction":
        record = {"prompt": data.instruction.template_no_input.format(instruction=text, input=""), "response": ""}
    else:
        record = {"text": text, "label": 0, "prompt": data.classification.template.format(text=text)}
    return formats.prompt_segments(record, data)


class Generator:
    """A loaded model with its tokenizer and the prompt format it was trained with."""

    def __init__(self, model: torch.nn.Module, tokenizer, data: DataConfig, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.data = data
        self.name = name
        self.context = context_length(model)
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id

    def encode(self, segments: list[formats.Segment]) -> list[int]:
        ids = formats.encode_segments(self.tokenizer, [segments])[0][0]
        return ids or [self.eos]  # GPT-2 convention: an empty prompt starts after <|endoftext|>

    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Prompt ids for one user text: the recipe's template applied (unless `raw`), tokenized as in training."""
        return self.encode([(text, False)] if raw else user_prompt_segments(text, self.data))

    def chat_ids(self, messages: list[Message]) -> list[int]:
        """Prompt ids for a conversation. Instruction and classification models are single-turn: the last user
        message goes through their template; other formats use the recipe's chat template."""
        if self.data.format in ("instruction", "classification"):
            last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
            if last is None:
                raise UserError("the conversation has no user message")
            return self.prompt_ids(last)
        return self.encode(formats.chat_segments(messages, self.data.chat, add_generation_prompt=True))

    def chat_stops(self) -> tuple[str, ...]:
        """Stop where the model starts writing the user's next turn (for models that never learned EOS)."""
        if self.data.format in ("instruction", "classification"):
            return ()
        prefix = self.data.chat.user.split("{content}")[0].strip()
        return (prefix,) if prefix else ()

    def reserve(self, max_new_tokens: int) -> int:
        """Room kept for the reply when fitting a prompt: max_new_tokens, at most half the window."""
        return min(max_new_tokens, self.context // 2)

    def fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep the end of a prompt that would not leave room for the reply."""
        keep = self.context - self.reserve(max_new_tokens)
        return ids[-keep:] if len(ids) > keep else ids

    def fit_chat(self, messages: list[Message], max_new_tokens: int) -> tuple[list[int], list[Message]]:
        """Drop the oldest turns (never a leading system message) until the prompt leaves room for the reply.
        Returns the prompt ids and the messages kept."""
        budget = self.context - self.reserve(max_new_tokens)
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        while True:
            ids = self.chat_ids(system + turns)
            if len(ids) <= budget:
                return ids, system + turns
            if len(turns) <= 1:
                raise UserError(f"the message is too long: {len(ids)} prompt tokens, but the context window of "
                                f"{self.context} tokens leaves {budget} for the prompt")
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> Request:
        request = Request(prompt_ids, params, on_text=on_text)
        self.run([request])
        return request

    def run(self, requests: list[Request]) -> None:
        """Generate all requests together, as one batch."""
        batch = Batch(self)
        batch.add(requests)
        while batch.rows:
            batch.step()


class Batch:
    """Sequences decoded together over one left-padded KV cache. Rows join between steps (their prompts are
    prefilled, then merged into the cache) and leave when they meet EOS, a stop string, their token budget or
    the end of the context window; padding columns no row needs any more are cut off."""

    def __init__(self, generator: Generator):
        self.g = generator
        self.rows: list[Request] = []
        self.cache: Any = None
        self.mask = self.position = self.seen = self.logits = torch.empty(0)

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> None:
        g = self.g
        rows = [r for r in requests if not r.cancelled and r._start(g.context, g.device)]
        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), g.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        # for the repetition penalty, padding repeats a real token of its row (changing nothing)
        seen = torch.where(mask.bool(), ids, ids[torch.arange(len(rows)), width - mask.sum(1)][:, None])
        ids, mask, seen = ids.to(g.device), mask.to(g.device), seen.to(g.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = g.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.seen = rows, out.past_key_values, mask, seen
            self.position, self.logits = position[:, -1:], out.logits[:, -1].float()
            return
        old, new = self.mask.shape[1], width
        for mine, theirs in zip(self.cache.layers, out.past_key_values.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, new - old, -2), _pad_left(theirs.keys, old - new, -2)])
            mine.values = torch.cat([_pad_left(mine.values, new - old, -2), _pad_left(theirs.values, old - new, -2)])
        self.mask = torch.cat([_pad_left(self.mask, new - old, 1), _pad_left(mask, old - new, 1)])
        self.seen = torch.cat([_pad_left(self.seen, new - old, 1, repeat=True),
                               _pad_left(seen, old - new, 1, repeat=True)])
        self.position = torch.cat([self.position, position[:, -1:]])
        self.logits = torch.cat([self.logits, out.logits[:, -1].float()])
        self.rows += rows

    @torch.inference_mode()
    def step(self) -> None:
        """Sample one token for every row; finished rows leave; the others advance by one position."""
        g = self.g
        tokens = self._sample()
        done = [r._accept(t, g.eos, g.decode) for r, t in zip(self.rows, tokens.tolist())]
        if all(done):
            self.rows = []
            return
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=g.device)
            self.cache.batch_select_indices(keep)
            self.mask, self.position, self.seen = self.mask[keep], self.position[keep], self.seen[keep]
            tokens = tokens[keep]
            self.rows = [r for r, d in zip(self.rows, done) if not d]
            self._trim()
        self.seen = torch.cat([self.seen, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.position = self.position + 1
        out = g.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                      past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()

    def _sample(self) -> torch.Tensor:
        """Next token per row; rows sharing settings are processed together, each row draws from its own seed."""
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.logits.device)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.rows):
            p = r.params
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty), []).append(i)
        for key, members in groups.items():
            index = torch.tensor(members, device=self.logits.device)
            scores = _processors(*key)(self.seen[index], self.logits[index])
            if key[0] == 0:
                tokens[index] = scores.argmax(-1)
                continue
            probs = _probabilities(scores, self.logits[index])
            for j, i in enumerate(members):
                tokens[i] = torch.multinomial(probs[j], 1, generator=self.rows[i]._rng)[0]
        return tokens

    def _trim(self) -> None:
        """Cut leading columns that are padding in every remaining row."""
        lead = int((self.mask.sum(0) == 0).int().cumprod(0).sum())
        if lead:
            self.mask, self.seen = self.mask[:, lead:], self.seen[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]


def _pad_left(tensor: torch.Tensor, size: int, dim: int, repeat: bool = False) -> torch.Tensor:
    """`size` columns before the first along `dim`: zeros, or copies of the first column."""
    if size <= 0:
        return tensor
    first = tensor.narrow(dim, 0, 1)
    shape = list(tensor.shape)
    shape[dim] = size
    pad = first.expand(*shape) if repeat else tensor.new_zeros(shape)
    return torch.cat([pad, tensor], dim=dim)


def trained_recipe(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe the model in `folder` was trained with (its recipe.yaml: the prompt template that applies even
    if the recipe file changed since), else `recipe`."""
    saved = folder / RECIPE_FILE
    if not saved.is_file():
        return recipe
    try:
        return recipe_from_dict(yaml.safe_load(saved.read_text()), folder, str(saved))
    except UserError as exc:
        print(f"note: using {recipe.source}, not {saved}: {exc}", file=sys.stderr)
        return recipe


def load_generator(recipe: Recipe, base: bool = False) -> Generator:
    """The run's `final/` model (adapter over its base, or a full model), or with `base` the bare base model."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[recipe.model.dtype] if device.type == "cuda" and recipe.model.dtype != "auto" else torch.float32
    if base:
        if recipe.model.base is None:
            raise UserError(f"{recipe.source}: --base needs 'model.base'; this recipe trains from scratch "
                            "('model.init'), so its base model is random weights")
        source = tokenizer_source(recipe)
        if source is None:
            from finetune.prepare import load_prepared_tokenizer

            tokenizer = load_prepared_tokenizer(recipe)
        else:
            tokenizer = load_tokenizer(source)
        model, data, name = load_base_model(recipe, tokenizer), recipe.data, f"{recipe.name}-base"
    else:
        final = recipe.run.final
        model, data, name = load_final(final, dtype), trained_recipe(recipe, final).data, recipe.name
        tokenizer = load_tokenizer(str(final))
    return Generator(model.to(device), tokenizer, data, name)


def recipe_params(recipe: Recipe) -> SamplingParams:
    """The recipe's `generate` section as sampling settings, checked."""
    cfg = recipe.generate
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty,
                            tuple(cfg.stop), cfg.seed)
    problem = params.problem()
    if problem:
        raise UserError(f"{recipe.source}: generate.{problem}")
    return params


def sampling_params(recipe: Recipe, options: dict[str, Any], stops: tuple[str, ...] = ()) -> SamplingParams:
    """The recipe's settings with the command-line `options` over them (SamplingParams fields; None = unset) and
    `stops` added; an unset seed is drawn and printed."""
    params = recipe_params(recipe)
    params = replace(params, **{k: v for k, v in options.items() if v is not None},
                     stop=tuple(dict.fromkeys([*params.stop, *stops])))
    problem = params.problem()
    if problem:
        raise UserError(f"{problem} (from the command-line options)")
    if params.seed is None:
        params = replace(params, seed=secrets.randbits(63))
        print(f"seed: {params.seed}", file=sys.stderr)
    return params


def write_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def generate(recipe: Recipe, prompts: list[str], params: SamplingParams, num_samples: int = 1, raw: bool = False,
             base: bool = False) -> None:
    """Stream `num_samples` completions of each prompt (seeds seed, seed+1, ...) to stdout."""
    generator = load_generator(recipe, base=base)
    jobs = [(prompt, sample) for prompt in prompts for sample in range(num_samples)]
    for prompt, sample in jobs:
        seed = (params.seed + sample) % SEED_RANGE
        if len(jobs) > 1:
            print(f"=== {prompt[:60]!r} - sample {sample + 1}/{num_samples} (seed {seed}) ===")
        ids = generator.prompt_ids(prompt, raw=raw)
        fitted = generator.fit(ids, params.max_new_tokens)
        if len(fitted) < len(ids):
            print(f"note: prompt cut to its last {len(fitted)} of {len(ids)} tokens to fit the context window "
                  f"({generator.context})", file=sys.stderr)
        generator.generate(fitted, replace(params, seed=seed), on_text=write_stream)
        print()
