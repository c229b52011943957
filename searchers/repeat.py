"""The noise floor's searcher: one train.py, unchanged, on N seeds on every device kind the
launcher offers.

It proposes nothing new on purpose. The spread of val_bpb over seeds of the same code is the
smallest difference a study can ever call a gain, and the offset between device kinds is how much
of a comparison across hardware is hardware (analysis.noise turns the study into both numbers).
"""
from __future__ import annotations

from typing import Any

from study.core import SearchContext, Searcher
from study.records import Candidate, Result, Trial


class RepeatSearcher(Searcher):
    """`seeds` runs of the study's baseline (study.baseline: the default train.py or any trial's)
    per device kind, seeds ctx.seed .. ctx.seed + seeds - 1. Each (kind, seed) runs once; a run
    that landed on another kind than it asked for counts for the kind it ran on."""

    def __init__(self, name: str = "repeat", seeds: int = 8):
        if not isinstance(seeds, int) or seeds < 2:
            raise ValueError(f"seeds must be an integer >= 2 (one run has no spread), not {seeds!r}")
        self.name = name
        self.seeds = seeds
        self.ran: set[tuple[str | None, int]] = set()
        self.asked: set[tuple[str | None, int]] = set()

    def jobs(self, ctx: SearchContext) -> list[tuple[str | None, int]]:
        kinds = sorted(ctx.device_kinds) or [None]
        return [(kind, ctx.seed + i) for i in range(self.seeds) for kind in kinds]

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        """At most as many runs per kind as that kind has free slots: the loop puts a candidate
        that asked for a busy kind on any free slot, which would measure the wrong kind."""
        self.asked |= {(t.candidate.device_kind, t.candidate.seed) for t in ctx.in_flight}
        free = {kind: spec.get("count", 1) for kind, spec in ctx.device_kinds.items()}
        for t in ctx.in_flight:
            free[t.device_kind] = free.get(t.device_kind, 0) - 1
        out = []
        for kind, seed in self.jobs(ctx):
            if len(out) == n:
                break
            if (kind, seed) in self.ran or (kind, seed) in self.asked or (free and free.get(kind, 0) <= 0):
                continue
            if free:
                free[kind] -= 1
            self.asked.add((kind, seed))
            where = f" on {kind}" if kind else ""
            out.append(Candidate(source=ctx.baseline_source, knobs={}, device_kind=kind, seed=seed,
                                 hypothesis=f"noise floor: the baseline, seed {seed}{where}"))
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        """A failed run still ran: repeating it would measure the same failure again."""
        ran_on = result.device_kind or trial.device_kind
        self.ran.add((ran_on, trial.seed))
        if ran_on != trial.candidate.device_kind:
            self.asked.discard((trial.candidate.device_kind, trial.seed))

    def done(self) -> bool:
        ctx = getattr(self, "ctx", None)
        return ctx is not None and all(job in self.ran for job in self.jobs(ctx))

    def summary(self) -> dict[str, Any]:
        return {"repeat_runs": len(self.ran)}
