"""Judge calls' token usage and estimated cost: per-run counters, list prices and the dry-run estimate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# USD per million (input, output) tokens, list prices at the time of writing; a setting overrides them.
# Only used for the *estimated* cost printed with a run; unknown models get no estimate.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-0314": (30.0, 60.0),
    "gpt-4-0613": (30.0, 60.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-2024-08-06": (2.5, 10.0),
    "gpt-4o-2024-05-13": (5.0, 15.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-3.5-turbo": (0.5, 1.5),
}


@dataclass
class UsageStats:
    """Calls and tokens of one run; ``*_cached`` counts what the cache saved (paid in an earlier run)."""

    calls_made: int = 0
    calls_cached: int = 0
    calls_failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_cached: int = 0
    completion_tokens_cached: int = 0
    failures: dict = field(default_factory=dict)  # reason -> count
    models_reported: dict = field(default_factory=dict)  # response.model -> count

    def estimated_cost_usd(self, prices: tuple[float, float] | None) -> float | None:
        if prices is None:
            return None
        return (self.prompt_tokens * prices[0] + self.completion_tokens * prices[1]) / 1e6

    def record(self, prices: tuple[float, float] | None) -> dict:
        out = asdict(self)
        out["estimated_cost_usd"] = self.estimated_cost_usd(prices)
        out["cost_note"] = ("estimated from list prices per million tokens" if prices
                            else "no price known for this judge model (pass --price-in/--price-out)")
        return out


def estimate_tokens(text_chars: int) -> int:
    """Rough token count of English text (≈ 4 characters per token, OpenAI's rule of thumb)."""
    return math.ceil(text_chars / 4)


@dataclass
class DryRunEstimate:
    """What a run would cost: calls not yet cached, and their token counts (prompt estimated at ~4
    characters per token; completion tokens bounded by each call's max_tokens)."""

    calls_total: int
    calls_cached: int
    calls_to_make: int
    prompt_tokens_estimate: int
    completion_tokens_max: int
    estimated_cost_usd_max: float | None

    def describe(self) -> str:
        cost = (f", at most ~${self.estimated_cost_usd_max:.2f}" if self.estimated_cost_usd_max is not None
                else ", cost unknown for this judge model")
        return (f"{self.calls_to_make} judge calls to make ({self.calls_cached} of {self.calls_total} cached): "
                f"~{self.prompt_tokens_estimate:,} prompt tokens, at most {self.completion_tokens_max:,} "
                f"completion tokens{cost}")
