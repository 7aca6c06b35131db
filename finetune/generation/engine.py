"""Batched decoding: sequences decoded together over one left-padded KV cache, each with its own settings, seed,
stop strings and streamed text. It needs a model, the token ids that end a sequence and a detokenizer; prompts
arrive as token ids."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune.generation.params import SEED_RANGE, SamplingParams
from finetune.generation.sampling import next_tokens
from finetune.generation.window import reply_budget
from finetune.modeling import context_length


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
        self._budget = reply_budget(len(self.prompt_ids), context, self.params.max_new_tokens)
        if self._budget < 1:
            self._finish("length", "")
            return False
        return True

    def _accept(self, token: int, eos: frozenset[int], decode: Callable[[list[int]], str]) -> bool:
        """Take one sampled token; True when the request is finished."""
        if self.cancelled:
            self.finish_reason = "cancelled"
            return True
        if token in eos:
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


class Engine:
    """What decoding needs: a model, the token ids that end a sequence (`eos`), and token ids -> text (`decode`)."""

    def __init__(self, model: torch.nn.Module, eos: Iterable[int], decode: Callable[[list[int]], str]):
        self.model = model
        self.eos = frozenset(eos)
        self.decode = decode
        self.pad = min(self.eos)  # any id would do: padding is masked
        self.context = context_length(model)
        self.device = next(model.parameters()).device

    def run(self, requests: list[Request]) -> None:
        """Decode all requests together, as one batch."""
        batch = Batch(self)
        batch.add(requests)
        while batch.rows:
            batch.step()


class Batch:
    """Sequences decoded together over one left-padded KV cache. Rows join between steps (their prompts are
    prefilled, then merged into the cache) and leave when they meet EOS, a stop string, their token budget or
    the end of the context window; padding columns no row needs any more are cut off."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: list[Request] = []
        self.cache: Any = None
        self.mask = self.position = self.seen = self.logits = torch.empty(0)

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> None:
        e = self.engine
        rows = [r for r in requests if not r.cancelled and r._start(e.context, e.device)]
        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), e.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        # for the repetition penalty, padding repeats a real token of its row (changing nothing)
        seen = torch.where(mask.bool(), ids, ids[torch.arange(len(rows)), width - mask.sum(1)][:, None])
        ids, mask, seen = ids.to(e.device), mask.to(e.device), seen.to(e.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.seen = rows, out.cache, mask, seen
            self.position, self.logits = position[:, -1:], out.logits[:, -1].float()
            return
        old, new = self.mask.shape[1], width
        for mine, theirs in zip(self.cache.layers, out.cache.layers):
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
        e = self.engine
        tokens = next_tokens(self.logits, self.seen, [r.params for r in self.rows], [r._rng for r in self.rows])
        done = [r._accept(t, e.eos, e.decode) for r, t in zip(self.rows, tokens.tolist())]
        if all(done):
            self.rows = []
            return
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], device=e.device)
            self.cache.batch_select_indices(keep)
            self.mask, self.position, self.seen = self.mask[keep], self.position[keep], self.seen[keep]
            tokens = tokens[keep]
            self.rows = [r for r, d in zip(self.rows, done) if not d]
            self._trim()
        self.seen = torch.cat([self.seen, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.position = self.position + 1
        out = e.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
                      cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()

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
