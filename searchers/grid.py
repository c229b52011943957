"""Full factorial grid: the "waves" the SkyPilot agent ran by hand, as a reproducible baseline.

Cells come in a stable order: itertools.product over the knobs in their declared order (the
searcher config's `levels`, else the space's), so the last knob varies fastest, like nested
loops. A cell is identified by its knob values, not its index, so a resumed study skips every
cell the journal already told, whatever order the config now lists, and re-proposes a cell that
was in flight when the orchestrator died unless the loop is re-running it (`ctx.in_flight`).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

from searchers import space as sp
from study.core import SearchContext, Searcher
from study.records import Candidate, Result, Trial


class GridSearcher(Searcher):
    """`levels` maps knob -> values (or null to take the space's levels for that knob; a knob
    need not be in the space); without it the grid spans every knob of the space. `max_grid`
    stops a typo from queueing a week of trials."""

    def __init__(self, name: str = "grid", levels: dict[str, Any] | None = None, max_grid: int = 256):
        self.name = name
        self.levels = sp.plain(levels) if levels else None
        self.max_grid = max_grid

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        space = sp.plain(ctx.space) or {}
        if self.levels:
            # Levels named here replace the space's spec (its range is Optuna's, not the grid's).
            space = {k: space.get(k, {}) if v is None else {"levels": v} for k, v in self.levels.items()}
        try:
            space = sp.validate_space(space, ctx.baseline_knobs)
            axes = [sp.levels(k, spec) for k, spec in space.items()]
        except ValueError as e:
            raise ValueError(f"levels: {e}") from None
        self.names = list(space)
        size = math.prod(len(a) for a in axes)
        if size > self.max_grid:
            shape = " x ".join(f"{k} {len(a)}" for k, a in zip(self.names, axes))
            raise ValueError(f"grid has {size} cells ({shape}), more than max_grid={self.max_grid}; "
                             f"name fewer knobs or levels, or raise searcher.max_grid")
        self.cells = [dict(zip(self.names, values)) for values in itertools.product(*axes)]
        self.keys = [sp.key(c, self.names) for c in self.cells]
        self.told: set[str] = set()
        self.asked: set[str] = set()

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        self.asked |= {sp.key(t.candidate.knobs, self.names) for t in ctx.in_flight}
        out = []
        for index, (cell, k) in enumerate(zip(self.cells, self.keys)):
            if len(out) == n:
                break
            if k in self.told or k in self.asked:
                continue
            self.asked.add(k)
            values = ", ".join(f"{name}={sp.fmt(v)}" for name, v in cell.items())
            out.append(sp.candidate(ctx, cell, f"grid {index + 1}/{len(self.cells)}: {values}",
                                    meta={"grid_index": index, "grid_size": len(self.cells)}))
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        """A failed cell is done too: a grid measures each cell once, crashes included."""
        self.told.add(sp.key(trial.candidate.knobs, self.names))

    def done(self) -> bool:
        return all(k in self.told or k in self.asked for k in self.keys)

    def summary(self) -> dict[str, Any]:
        return {"grid_cells": len(self.cells), "grid_told": len(self.told & set(self.keys))}
