"""The rung schedule a study runs (`study.rungs`, `study.eta`): successive halving's budget fractions,
each optionally on one device kind. A study setting like the stop rules, so it is validated with them
before any compute; the promotions themselves are a searcher wrapper (searchers/rungs.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rung:
    """A complete run on `fraction` of the budget, on slots of `kind` (any kind when None)."""

    fraction: float
    kind: str | None = None


def parse_rungs(spec: Any, eta: Any) -> list[Rung]:
    """`[0.25, 0.5, 1.0]`, or entries `{fraction: 0.25, kind: T4}`: rungs in strictly increasing
    fraction ending at the whole budget. ValueError with one line otherwise."""
    if not isinstance(eta, int) or isinstance(eta, bool) or eta < 2:
        raise ValueError(f"study.eta must be an integer >= 2, not {eta!r}")
    if not isinstance(spec, (list, tuple)) or len(spec) < 2:
        raise ValueError(f"study.rungs must be a list of at least two budget fractions, not {spec!r}")
    rungs = []
    for entry in spec:
        if isinstance(entry, dict):
            unknown = set(entry) - {"fraction", "kind"}
            if unknown or "fraction" not in entry:
                raise ValueError(f"study.rungs entry must be a fraction or {{fraction, kind}}, not {entry!r}")
            fraction, kind = entry["fraction"], entry.get("kind")
        else:
            fraction, kind = entry, None
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"study.rungs: a fraction must be a number in (0, 1], not {fraction!r}")
        rungs.append(Rung(float(fraction), None if kind is None else str(kind)))
    fractions = [r.fraction for r in rungs]
    if any(a >= b for a, b in zip(fractions, fractions[1:])):
        raise ValueError(f"study.rungs must increase strictly, not {fractions}")
    if fractions[-1] != 1.0:
        raise ValueError(f"study.rungs must end at 1.0 (the whole budget: only it counts), not {fractions[-1]}")
    return rungs


def check_rung_kinds(rungs: list[Rung], kinds: dict[str, Any]) -> None:
    """A rung naming a device kind the launcher has no slot of would never run."""
    for i, rung in enumerate(rungs):
        if rung.kind is not None and rung.kind not in kinds:
            raise ValueError(f"study.rungs[{i}] names device kind {rung.kind!r}; "
                             f"the launcher's slots are {', '.join(sorted(kinds)) or 'none'}")
