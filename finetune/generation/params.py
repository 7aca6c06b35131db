"""Sampling settings: what a request asks of the decoder, and how the settings a caller gives go over defaults."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from finetune.recipe import GenerateConfig

SEED_RANGE = 2**64  # seeds are taken modulo this
DEFAULTS = GenerateConfig()  # the recipe's `generate` defaults are the only ones


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULTS.max_new_tokens
    temperature: float = DEFAULTS.temperature  # 0 = greedy
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k  # 0 = off
    repetition_penalty: float = DEFAULTS.repetition_penalty
    stop: tuple[str, ...] = tuple(DEFAULTS.stop)
    seed: int | None = DEFAULTS.seed  # None = a fresh random seed

    @classmethod
    def from_config(cls, cfg: GenerateConfig) -> SamplingParams:
        """A recipe's `generate` section (checked against the bounds when the recipe was loaded)."""
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty, tuple(cfg.stop),
                   cfg.seed)

    def merged(self, settings: Mapping[str, Any], more_stops: Iterable[str] = ()) -> SamplingParams:
        """These settings with the given `settings` over them (field name -> value; None = not given), and
        `more_stops` added to the stop strings."""
        params = replace(self, **{name: value for name, value in settings.items() if value is not None})
        return replace(params, stop=tuple(dict.fromkeys([*params.stop, *more_stops])))
