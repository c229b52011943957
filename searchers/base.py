"""The interface every searcher implements: Optuna's ask/tell, sized to free slots.

A searcher never sees a launcher. The loop calls `ask(n, ctx)` with the number of free slots and a
read-only view of the study; it may return fewer candidates (or none yet, e.g. a grid waiting for a
wave to finish). The loop calls `tell` once per finished trial, including on resume, when the
journal is replayed, so a searcher must rebuild its state from `tell` alone.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from study.records import Candidate, Result, Trial


@dataclass
class SearchContext:
    """What a searcher may know about the study. `space` maps knob -> spec dict (type, low, high,
    log, levels, choices; see conf/space/); `device_kinds` maps kind -> how many slots and their
    relative speed, so an agent never has to guess which hardware it got."""

    baseline_source: str
    baseline_knobs: dict[str, Any]
    space: dict[str, dict[str, Any]]
    seed: int
    study_dir: str
    objective: dict[str, Any]
    device_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[Trial, Result]] = field(default_factory=list)
    in_flight: list[Trial] = field(default_factory=list)

    def best(self) -> tuple[Trial, Result] | None:
        done = [(t, r) for t, r in self.history if r.ok]
        return min(done, key=lambda tr: tr[1].score()) if done else None

    def best_score(self) -> float:
        b = self.best()
        return b[1].score() if b else math.inf


class Searcher(ABC):
    """Proposes candidates and learns from results. Subclasses set `name`."""

    name: str = "base"

    def setup(self, ctx: SearchContext) -> None:
        """Called once before the first ask (and before the journal replay on resume)."""
        self.ctx = ctx

    @abstractmethod
    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        """Up to `n` new candidates. May block (an agent thinking): the loop runs it beside the
        trials in flight."""

    def tell(self, trial: Trial, result: Result) -> None:
        """Learn from one finished trial. Failures arrive with `result.score() == inf`."""

    def done(self) -> bool:
        """True when the searcher has nothing more to propose (grid exhausted, budget spent)."""
        return False

    def summary(self) -> dict[str, Any]:
        """Numbers the study logs on its parent run at the end (e.g. agent tokens and dollars)."""
        return {}

    def close(self) -> None:
        pass
