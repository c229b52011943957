"""What a candidate changes against the baseline, in the few characters a table cell or a run
description can spare.

A person scanning a study asks "what did this trial try?", and a searcher's own hypothesis text
(`TPE #7: MATRIX_LR=0.07363929961016057, ...`) answers it badly: long, unordered, and without the
value it moved away from. The changed knobs, `MATRIX_LR 0.025→0.0736`, shortest first, answer it in
the first column a narrow terminal still shows.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

SIGNIFICANT_DIGITS = 4  # as many as searchers/space.py keeps of a sampled value


def short(value: Any) -> str:
    """A knob value as a person reads it: floats to a few significant digits, the rest as is."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(short(v) for v in value) + ")"
    return str(value)


def knob_changes(knobs: Mapping[str, Any], baseline_knobs: Mapping[str, Any]) -> list[str]:
    """`NAME old→new` for every knob whose value differs from the baseline's, shortest first."""
    changed = []
    for name, value in knobs.items():
        old = baseline_knobs.get(name)
        if _canonical(value) != _canonical(old):
            changed.append(f"{name} {short(old)}→{short(value)}")
    return sorted(changed, key=lambda text: (len(text), text))


def summary(candidate, baseline_knobs: Mapping[str, Any]) -> str:
    """One line for a trial: its knob changes, else its own hypothesis (an agent's code edit),
    else `baseline`."""
    changes = knob_changes(candidate.knobs, baseline_knobs)
    if changes:
        return ", ".join(changes)
    return " ".join((candidate.hypothesis or "").split()) or "baseline"


def _canonical(value: Any) -> str:
    """Equal for a value before and after the journal's JSON round trip (a tuple comes back a list)."""
    return json.dumps(value)
