"""What the agent costs: dollars per Messages API call from its `usage` block and a dated price
table in the config, kept in `costs.jsonl` so a resumed study keeps counting against the same
`max_usd` instead of starting again from zero.

The usage fields are the API's own (input_tokens, cache_creation_input_tokens with its 5m/1h split,
cache_read_input_tokens, output_tokens); `output_tokens` already includes thinking tokens.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PER_TOKEN = 1e-6  # prices are in $ per million tokens


@dataclass(frozen=True)
class Prices:
    """$ per million tokens for one model."""

    input: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    output: float

    @classmethod
    def for_model(cls, table: dict[str, dict[str, float]], model: str) -> "Prices":
        if model not in table:
            raise ValueError(
                f"no price for model {model!r} in searcher.prices (known: {sorted(table)}); "
                "add its $/MTok figures to conf/searcher/claude.yaml"
            )
        row = dict(table[model])
        missing = [f.name for f in fields(cls) if f.name not in row]
        if missing:
            raise ValueError(f"searcher.prices.{model} lacks {missing}")
        return cls(**{f.name: float(row[f.name]) for f in fields(cls)})


@dataclass
class Tokens:
    input: int = 0
    cache_write: int = 0
    cache_read: int = 0
    output: int = 0

    def __iadd__(self, other: "Tokens") -> "Tokens":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_meta(self, prefix: str = "agent_") -> dict[str, int]:
        return {f"{prefix}{k}_tokens": v for k, v in asdict(self).items()}


def call_cost(usage: Any, prices: Prices) -> tuple[Tokens, float]:
    """Tokens and dollars of one response. Cache writes are priced by their TTL when the API
    splits them; an unsplit count is priced as a 5-minute write (the API's default TTL)."""
    written = usage.cache_creation_input_tokens or 0
    split = getattr(usage, "cache_creation", None)
    if split is not None:
        w1h, w5m = split.ephemeral_1h_input_tokens, split.ephemeral_5m_input_tokens
    else:
        w1h, w5m = 0, written
    tokens = Tokens(
        input=usage.input_tokens or 0,
        cache_write=written,
        cache_read=usage.cache_read_input_tokens or 0,
        output=usage.output_tokens or 0,
    )
    usd = PER_TOKEN * (
        tokens.input * prices.input
        + w5m * prices.cache_write_5m
        + w1h * prices.cache_write_1h
        + tokens.cache_read * prices.cache_read
        + tokens.output * prices.output
    )
    return tokens, usd


class Ledger:
    """Running totals plus one JSON line per call. Reloads the file on start (study resume)."""

    def __init__(self, path: str | Path, prices: Prices, model: str):
        self.path = Path(path)
        self.prices = prices
        self.model = model
        self.usd = 0.0
        self.tokens = Tokens()
        self.calls = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                self.usd += row["usd"]
                self.tokens += Tokens(**row["tokens"])
                self.calls += 1

    def record(self, usage: Any, *, wave: int, turn: int) -> tuple[Tokens, float]:
        tokens, usd = call_cost(usage, self.prices)
        self.usd += usd
        self.tokens += tokens
        self.calls += 1
        row = {"wave": wave, "turn": turn, "model": self.model, "tokens": asdict(tokens),
               "usd": usd, "usd_total": self.usd}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return tokens, usd
