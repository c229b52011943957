"""What grid, greedy and Optuna share about a knob space: its levels, a canonical key for a set of
values, a hypothesis line, a candidate. The space itself is defined and validated in study/space.py,
before the study starts; these helpers take a validated one.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from study.core import SearchContext
from study.records import Candidate
from study.space import plain, validate_space

__all__ = ["plain", "validate_space", "levels", "key", "describe", "significant", "fmt", "candidate",
           "MAX_IMPLICIT_LEVELS"]

# An int range this short is its own level list, so `DEPTH: {low: 2, high: 6}` can be gridded.
MAX_IMPLICIT_LEVELS = 16


def levels(name: str, spec: dict[str, Any]) -> list[Any]:
    """The ordered values grid and greedy step through for one knob of a validated space."""
    if "levels" in spec:
        return list(spec["levels"])
    if spec["type"] == "int":
        values = list(range(spec["low"], spec["high"] + 1, spec.get("step") or 1))
        if len(values) <= MAX_IMPLICIT_LEVELS:
            return values
    raise ValueError(f"knob {name} has no levels; give `levels: [...]` for grid and greedy")


def key(values: Mapping[str, Any], names: Sequence[str]) -> str:
    """A canonical string for the values of `names`, equal for a candidate before and after its
    JSON round trip through the journal (a tuple comes back as a list, 3.0 stays 3.0)."""
    return json.dumps([values.get(n) for n in names])


def describe(values: Mapping[str, Any], baseline_knobs: Mapping[str, Any]) -> str:
    """`MATRIX_LR=0.03, DEPTH=3`: the knobs that differ from the baseline, for a hypothesis."""
    changed = [f"{k}={fmt(v)}" for k, v in values.items() if key({k: v}, [k]) != key(baseline_knobs, [k])]
    return ", ".join(changed) or "baseline values"


def significant(value: Any, digits: int = 4) -> Any:
    """A sampled float cut to `digits` significant digits, so that train.py (and its diff) reads
    0.07364 rather than 0.07363929961016057; what is written is exactly what runs. A value inside
    a range whose bounds have no more digits stays inside it."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.{digits}g}")
    return value


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def candidate(ctx: SearchContext, values: dict[str, Any], hypothesis: str, parent: str | None = None,
              meta: dict[str, Any] | None = None) -> Candidate:
    """The baseline train.py with `values` written into its knobs."""
    return Candidate(
        source=ctx.with_knobs(values),
        knobs=json.loads(json.dumps(values)),  # as the journal will hand it back: tuples as lists
        parent=parent,
        hypothesis=hypothesis,
        meta=dict(meta or {}),
    )
