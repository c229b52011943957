"""Greedy coordinate hill-climbing: the one-GPU autoresearch loop without an LLM.

From the current best (the incumbent, the baseline at first) it changes one knob one level down
or up, keeps the change if the result beats the incumbent by more than `min_improvement`, and
moves on to the next knob/direction: the moves cycle (DEPTH down, DEPTH up, MATRIX_LR down, ...)
and after an improvement the cycle goes on from the move after the improving one. A knob value
between two levels steps to the nearest level on either side; a categorical knob walks its
levels in their listed order. A configuration is never run twice; a failure is never better.

It stops (`done()`) at a local optimum: every neighbour of the incumbent has a result and none
beat it. It does not restart with a finer step: the levels are the resolution the space asked
for. With n free slots it hands out up to n untried neighbours of the incumbent at once (the
baseline's neighbours go out beside the baseline itself), so with one slot it is strictly
sequential. Its state is a function of the told results in order, so a journal replay rebuilds
it exactly; it uses no randomness, so the seed does not change it.
"""
from __future__ import annotations

import json
import math
from typing import Any

from searchers import space as sp
from study.core import SearchContext, Searcher
from study.records import Candidate, Result, Trial


class GreedySearcher(Searcher):
    def __init__(self, name: str = "greedy", min_improvement: float = 0.0):
        if min_improvement < 0:
            raise ValueError(f"min_improvement must be >= 0, got {min_improvement}")
        self.name = name
        self.min_improvement = min_improvement

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        space = sp.validate_space(ctx.space, ctx.baseline_knobs)
        self.names = list(space)
        self.levels = {k: sp.levels(k, spec) for k, spec in space.items()}
        for k, spec in space.items():
            if spec["type"] == "categorical" and _position(self.levels[k], ctx.baseline_knobs[k]) is None:
                raise ValueError(f"the baseline value {ctx.baseline_knobs[k]!r} of {k} is not "
                                 f"among its levels {self.levels[k]}; greedy walks from it")
        self.moves = [(k, step) for k in self.names for step in (-1, 1)]
        self.baseline = {k: ctx.baseline_knobs[k] for k in self.names}
        self.incumbent = dict(self.baseline)
        self.best = math.inf
        self.next_move = 0
        self.results: dict[str, float] = {}  # config key -> score
        self.trial_ids: dict[str, str] = {}  # config key -> trial id that ran it
        self.pending: set[str] = set()

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        for t in ctx.in_flight:
            k = self._key(t.candidate.knobs)
            self.pending.add(k)
            self.trial_ids.setdefault(k, t.trial_id)
        out: list[Candidate] = []
        if n > 0 and self._untried(self.baseline):
            self.pending.add(self._key(self.baseline))
            out.append(sp.candidate(ctx, self.baseline, "greedy: baseline", meta={"greedy_move": None}))
        for move, values in self._neighbours():
            if len(out) >= n:
                break
            knob, _ = self.moves[move]
            parent = self.trial_ids.get(self._key(self.incumbent))
            hypothesis = (f"greedy: {knob} {sp.fmt(self.incumbent[knob])}->{sp.fmt(values[knob])} "
                          f"from {parent or 'baseline'}")
            self.pending.add(self._key(values))
            out.append(sp.candidate(ctx, values, hypothesis, parent=parent,
                                    meta={"greedy_move": list(self.moves[move])}))
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        values = {k: trial.candidate.knobs.get(k) for k in self.names}
        k = self._key(values)
        self.pending.discard(k)
        self.results[k] = result.score()
        self.trial_ids[k] = trial.trial_id
        if result.score() < self.best - self.min_improvement:
            self.incumbent, self.best = values, result.score()
            move = trial.candidate.meta.get("greedy_move")
            if move is not None and tuple(move) in self.moves:
                self.next_move = (self.moves.index(tuple(move)) + 1) % len(self.moves)

    def done(self) -> bool:
        return not self.pending and not self._untried(self.baseline) and next(self._neighbours(), None) is None

    def summary(self) -> dict[str, Any]:
        return {"greedy_configs": len(self.results)}

    def _neighbours(self):
        """(move index, config) for each untried one-level step from the incumbent, in cycle
        order starting at `next_move`."""
        for i in range(len(self.moves)):
            move = (self.next_move + i) % len(self.moves)
            knob, step = self.moves[move]
            value = _step(self.levels[knob], self.incumbent[knob], step)
            if value is None:
                continue
            values = {**self.incumbent, knob: value}
            if self._untried(values):
                yield move, values

    def _untried(self, values: dict[str, Any]) -> bool:
        k = self._key(values)
        return k not in self.results and k not in self.pending

    def _key(self, values: dict[str, Any]) -> str:
        return sp.key(values, self.names)


def _position(levels: list[Any], value: Any) -> int | None:
    text = json.dumps(value)
    return next((i for i, v in enumerate(levels) if json.dumps(v) == text), None)


def _step(levels: list[Any], value: Any, step: int) -> Any:
    """The level one step from `value`: the neighbour in list order when `value` is a level (or
    a categorical), else the nearest level below/above a number between levels."""
    i = _position(levels, value)
    if i is not None:
        j = i + step
        return levels[j] if 0 <= j < len(levels) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        side = [v for v in levels if (v < value if step < 0 else v > value)]
        return (max(side) if step < 0 else min(side)) if side else None
    return None
