"""Sampling settings: what a request asks of the decoder, and how the settings a caller gives go over defaults."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from finetune.recipe import GenerateConfig

SEED_RANGE = 2**64  # seeds are taken modulo this


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

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> SamplingParams:
        """A recipe's `generate` section (checked when the recipe was loaded)."""
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, tuple(cfg.stop),
                   cfg.seed)

    def merged(self, settings: Mapping[str, Any], more_stops: Iterable[str] = ()) -> SamplingParams:
        """These settings with the given `settings` over them (field name -> value; None = not given), and
        `more_stops` added to the stop strings."""
        params = replace(self, **{name: value for name, value in settings.items() if value is not None})
        return replace(params, stop=tuple(dict.fromkeys([*params.stop, *more_stops])))
