"""What the agent costs: dollars per answered Messages API call from its `usage` block, priced at
the row of the model that answered (the requested one, or a fallback after a refusal), times the
regional multiplier when `usage.inference_geo` says inference ran in one region (US-only: 1.1x for
Opus 4.6 and later models). Kept in `costs.jsonl`, one line per call, so a resumed study keeps
counting against the same `max_usd` instead of starting again from zero.

The usage fields are the API's own (input_tokens, cache_creation_input_tokens with its 5m/1h split,
cache_read_input_tokens, output_tokens, inference_geo); `output_tokens` already includes thinking
tokens. Two rows are not plain usage:

- a refusal declined before any output is not billed (the API's refusal docs), so it costs $0 and
  says so; a refusal after some output is billed like any answer;
- a call a read timeout cut after the request went out may have generated, and been billed for,
  tokens the API never reported: it is priced as an estimate (the request's size at the input price
  plus the seconds it ran at `output_tokens_per_s`) and marked `estimated`, so the ledger never
  claims a precision it lacks.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PER_TOKEN = 1e-6  # prices are in $ per million tokens
CHARS_PER_TOKEN = 4


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


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def call_cost(usage: Any, prices: Prices, multiplier: float = 1.0) -> tuple[Tokens, float]:
    """Tokens and dollars of one response (a dict or the SDK's usage object). Cache writes are
    priced by their TTL when the API splits them; an unsplit count is priced as a 5-minute write
    (the API's default TTL)."""
    written = _get(usage, "cache_creation_input_tokens") or 0
    split = _get(usage, "cache_creation")
    if split is not None:
        w1h, w5m = _get(split, "ephemeral_1h_input_tokens") or 0, _get(split, "ephemeral_5m_input_tokens") or 0
    else:
        w1h, w5m = 0, written
    tokens = Tokens(input=_get(usage, "input_tokens") or 0, cache_write=written,
                    cache_read=_get(usage, "cache_read_input_tokens") or 0, output=_get(usage, "output_tokens") or 0)
    usd = PER_TOKEN * multiplier * (
        tokens.input * prices.input
        + w5m * prices.cache_write_5m
        + w1h * prices.cache_write_1h
        + tokens.cache_read * prices.cache_read
        + tokens.output * prices.output
    )
    return tokens, usd


class PriceBook:
    """Every model's price row the searcher may be answered by, and the regional multipliers."""

    def __init__(self, table: dict[str, dict[str, float]], models: list[str], regional: dict[str, float] | None = None):
        self.rows = {m: Prices.for_model(table, m) for m in models}
        self.regional = {str(k): float(v) for k, v in (regional or {}).items()}
        self.default = models[0]

    def row_name(self, model: str | None) -> str:
        """The price row an answering model's id names: its own, else the row its id starts with (the
        API may answer an alias with a dated id), else the requested model's."""
        model = model or ""
        if model in self.rows:
            return model
        return max((m for m in self.rows if model.startswith(m)), key=len, default=self.default)

    def prices(self, model: str | None) -> Prices:
        return self.rows[self.row_name(model)]

    def multiplier(self, geo: str | None) -> float:
        return self.regional.get(geo or "global", 1.0)


class Ledger:
    """Running totals plus one JSON line per call. Reloads the file on start (study resume)."""

    def __init__(self, path: str | Path, book: PriceBook, output_tokens_per_s: float = 50.0):
        self.path = Path(path)
        self.book = book
        self.output_tokens_per_s = float(output_tokens_per_s)
        self.usd = 0.0
        self.tokens = Tokens()
        self.calls = 0
        self.estimated = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                self.usd += row["usd"]
                self.tokens += Tokens(**row["tokens"])
                self.calls += 1
                self.estimated += bool(row.get("estimated"))

    def record(self, usage: Any, *, model: str | None, wave: int, turn: int, stop_reason: str | None = None,
               refusal: dict | None = None) -> tuple[Tokens, float, dict]:
        """One answered call, priced at `model`'s row (and its region's multiplier)."""
        geo = _get(usage, "inference_geo")
        tokens, usd = call_cost(usage, self.book.prices(model), self.book.multiplier(geo))
        row: dict[str, Any] = {"wave": wave, "turn": turn, "model": model, "tokens": asdict(tokens), "usd": usd,
                               "inference_geo": geo, "stop_reason": stop_reason}
        if refusal is not None:
            row["refusal"] = refusal
            if tokens.output == 0:  # declined before any output: the API does not bill it
                row.update(usd=0.0, unbilled="refused before any output")
        credit = _get(usage, "fallback_credit")
        if credit is not None:
            status = _get(credit, "status")
            row["fallback_credit"] = _get(status, "type")
        return tokens, row["usd"], self._append(row, tokens)

    def record_cut(self, request: dict, seconds: float, *, wave: int, turn: int) -> tuple[Tokens, float, dict]:
        """A call a read timeout cut after it was sent: an estimate, marked as one."""
        model = request.get("model")
        prompt = {k: request.get(k) for k in ("system", "tools", "messages")}
        generated = min(int(request.get("max_tokens") or 0), int(seconds * self.output_tokens_per_s))
        usage = {"input_tokens": len(json.dumps(prompt)) // CHARS_PER_TOKEN, "output_tokens": generated,
                 "inference_geo": request.get("inference_geo")}
        tokens, usd = call_cost(usage, self.book.prices(model), self.book.multiplier(usage["inference_geo"]))
        row = {"wave": wave, "turn": turn, "model": model, "tokens": asdict(tokens), "usd": usd, "estimated": True,
               "inference_geo": usage["inference_geo"], "stop_reason": None,
               "note": f"cut by a read timeout after {seconds:.1f} s; input from the request's size, output at "
                       f"{self.output_tokens_per_s:g} tokens/s"}
        self.estimated += 1
        return tokens, usd, self._append(row, tokens)

    def _append(self, row: dict, tokens: Tokens) -> dict:
        self.usd += row["usd"]
        self.tokens += tokens
        self.calls += 1
        row["usd_total"] = self.usd
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row
