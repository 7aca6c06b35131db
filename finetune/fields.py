"""The rules a recipe field carries: its range of numbers (`ranged`), kept in the field's metadata and enforced
by the one pass that builds a recipe (finetune/recipe.py). Choices are `Literal` types on the field itself."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple


class Bound(NamedTuple):
    """The numbers a key allows: from `low` (itself allowed when `low_ok`) to `high` (allowed when `high_ok`; None:
    no limit)."""
    low: float
    high: float | None = None
    low_ok: bool = True
    high_ok: bool = False

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_ok else value > self.low
        return above and (self.high is None or (value <= self.high if self.high_ok else value < self.high))

    def allowed(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high_ok:
            return f"in {'[' if self.low_ok else '('}{low}, {high}]"
        if self.high is not None:
            return f"between {low} and {high}"
        return f"at least {low}" if self.low_ok else f"above {low}"


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def ranged(default: Any, low: float, high: float | None = None, *, low_ok: bool = True, high_ok: bool = False) -> Any:
    """A numeric field and the numbers it allows, checked when the recipe loads (null passes where the field is
    optional). The generate.* and serve.* ranges are also those of the command-line options and the HTTP API."""
    return field(default=default, metadata={"bound": Bound(low, high, low_ok, high_ok)})
