"""The budget every study of a comparison is cut at, named before the comparison is made.

"A beats B at equal compute" needs one compute point for every study, and each study's own best
up to that point: every trial that finished at or before it counts. Three measures:

    trials   finished trials, a screening rung counted at its budget fraction. On a steps or tokens
             budget over a cost-neutral space (the cpu and tiny presets) every full trial is charged
             the same compute, so equal trials is equal compute, and it does not move with the
             machine's load.
    compute  charged slot-hours: each trial's t_finished - t_started on the study clock (GPU-h on
             accelerators; on the simulated launcher with seconds_per_budget_unit, steps x that
             plus each trial's real start-up and evaluation).
             On a real CPU with a steps budget these are loaded wall seconds: several-fold apart
             between studies for the same work.
    wall     active study time: t_finished on the study clock, in hours.

Where the value comes from, in order: the command line (`--budget trials=24`), the experiment's
`compare.measure` / `compare.at` logged on every parent run, the studies' own limits
(study.max_trials, study.max_hours), and only failing those the least any study used, which the
report then says, because on a real clock that point is set by the fastest study's luck.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.curves import staircase

MEASURES = ("trials", "compute", "wall")
ALIASES = {"trials": "trials", "trial": "trials", "compute": "compute", "gpu-h": "compute", "slot-h": "compute",
           "gpu_hours": "compute", "wall": "wall", "wall-h": "wall", "time": "wall", "active": "wall"}
# The staircase axis (analysis.curves) each measure reads.
AXIS = {"trials": "trials", "compute": "gpu_hours", "wall": "wall"}
# Staircase x units per budget unit: the time axis is in seconds, a wall budget in hours.
SCALE = {"trials": 1.0, "compute": 1.0, "wall": 3600.0}
COST_NEUTRAL_KINDS = {"steps", "tokens"}
# A trial that finished exactly at the cut counts, even when the cut was computed by another sum.
REL_TOL = 1e-9


class BudgetError(ValueError):
    """A budget that cannot be read or applied (one line)."""


@dataclass(frozen=True)
class Budget:
    measure: str  # one of MEASURES
    at: float  # trials, slot-hours or hours of active study time
    origin: str  # why this value, in words the report prints

    @property
    def column(self) -> str:
        return f"best_at_{self.measure}"

    def title(self, unit: str = "GPU-h") -> str:
        """'equal trials (24 per study)', the words a claim uses for the point it was made at."""
        if self.measure == "trials":
            return f"equal trials ({_number(self.at)} per study)"
        if self.measure == "compute":
            return f"equal {unit} ({self.at:.3g} per study)"
        return f"equal active study time ({self.at:.3g} h)"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


def parse(text: str) -> tuple[str, float | None]:
    """'trials', 'trials=24', 'compute=0.5' (slot-hours), 'wall=2' (hours) -> (measure, value)."""
    name, _, value = text.partition("=")
    measure = ALIASES.get(name.strip().lower())
    if measure is None:
        raise BudgetError(f"--budget {text!r}: the measure must be one of {', '.join(MEASURES)} (e.g. trials=24)")
    if not value:
        return measure, None
    try:
        at = float(value)
    except ValueError:
        raise BudgetError(f"--budget {text!r}: {value!r} is not a number") from None
    if not at > 0 or math.isinf(at):
        raise BudgetError(f"--budget {text!r}: the budget must be a positive number")
    return measure, at


def totals(trials: pd.DataFrame, measure: str) -> pd.Series:
    """Per study, how much of the measure it used by its last finished trial."""
    return trials.groupby("study_id").apply(lambda g: _end(staircase(g, AXIS[measure])), include_groups=False) / SCALE[measure]


def _end(stair: pd.DataFrame) -> float:
    return float(stair["x"].iloc[-1]) if len(stair) else 0.0


def cut(study_trials: pd.DataFrame, budget: Budget) -> dict:
    """One study at the budget: its best val_bpb among the trials finished at or before the cut
    (NaN when none of them is ok), how many trials that kept, and whether the study reached the
    budget (one that stopped short is compared with what it had)."""
    stair = staircase(study_trials, AXIS[budget.measure])
    x = stair["x"] / SCALE[budget.measure]
    kept = stair[x <= budget.at * (1 + REL_TOL) + 1e-12]
    best = kept["val_bpb"].min() if len(kept) else math.nan
    used = _end(stair) / SCALE[budget.measure]
    return {"best": float(best) if pd.notna(best) else math.nan, "kept": len(kept), "total": len(stair),
            "used": used, "reached": used >= budget.at * (1 - REL_TOL)}


def _common(values: pd.Series):
    """The one value every study shares, or None (missing anywhere, or different)."""
    v = values.dropna().unique() if len(values) else []
    return v[0] if len(v) == 1 and values.notna().all() else None


def _param(studies: pd.DataFrame, column: str) -> pd.Series:
    return studies[column] if column in studies else pd.Series([None] * len(studies), index=studies.index)


def budget_kinds(studies: pd.DataFrame, trials: pd.DataFrame) -> set[str]:
    """The objective budget kinds of these studies: from their parent run's params, else from the
    trials' budget_kind tags."""
    kinds = set(_param(studies, "budget_kind").dropna().astype(str)) - {""}
    if not kinds and "budget_kind" in trials:
        kinds = set(trials["budget_kind"].dropna().astype(str)) - {""}
    return kinds


def default_measure(studies: pd.DataFrame, trials: pd.DataFrame) -> tuple[str, str]:
    """(measure, why) when nobody named one."""
    named = _common(_param(studies, "compare_measure"))
    if named is not None:
        if str(named).lower() not in ALIASES:
            raise BudgetError(f"the studies' compare.measure is {named!r}; it must be one of {', '.join(MEASURES)}")
        return ALIASES[str(named).lower()], "compare.measure named by the experiment"
    kinds = budget_kinds(studies, trials)
    if kinds and kinds <= COST_NEUTRAL_KINDS:
        return "trials", (f"a {'/'.join(sorted(kinds))} budget: every full trial is charged the same compute, "
                          "whatever the machine's load")
    return "compute", ("charged slot-hours, the measure of a seconds budget" if kinds
                       else "charged slot-hours (the studies log no budget kind)")


def default_at(measure: str, studies: pd.DataFrame, trials: pd.DataFrame) -> tuple[float, str]:
    """(value, origin) of a measure's budget when the command line gave none."""
    named = _common(_param(studies, "compare_measure"))
    named_at = _common(_param(studies, "compare_at"))
    if named is not None and named_at is not None and ALIASES.get(str(named).lower()) == measure:
        return float(named_at), "compare.at named by the experiment"
    if measure == "trials":
        limits = _param(studies, "max_trials")
        if limits.notna().all() and len(limits):
            if limits.nunique() == 1:
                return float(limits.iloc[0]), "study.max_trials named by the experiment"
            return float(limits.min()), (f"the least study.max_trials of these studies ({', '.join(map(_number, sorted(limits.unique())))})")
    if measure == "wall":
        hours = _common(_param(studies, "max_hours"))
        if hours is not None:
            return float(hours), "study.max_hours named by the experiment"
    used = totals(trials, measure)
    return float(used.min()), f"the least any study used (study {used.idxmin()}): no budget named for this measure"


def time_is_the_budget(studies: pd.DataFrame, trials: pd.DataFrame) -> bool:
    """Whether the study clock measures the searcher rather than the machine: on a seconds budget
    each trial holds its slot for its budget. On a steps budget it does not, not even on the
    simulated launcher, whose clock adds each trial's real start-up and evaluation seconds."""
    kinds = budget_kinds(studies, trials)
    return bool(kinds) and not kinds <= COST_NEUTRAL_KINDS


def resolve(studies: pd.DataFrame, trials: pd.DataFrame, requested: list[str] | None = None) -> tuple[list[Budget], list[str]]:
    """The budgets a report compares at (the first is the headline) and the notes it must print.
    Without --budget: the default measure at its named value, plus equal active study time when
    that time is named (study.max_hours) or is what the trials are budgeted in (seconds)."""
    notes: list[str] = []
    budgets: list[Budget] = []
    for text in requested or []:
        measure, at = parse(text)
        if any(b.measure == measure for b in budgets):
            raise BudgetError(f"--budget names {measure} twice")
        origin = "given on the command line"
        if at is None:
            at, origin = default_at(measure, studies, trials)
        budgets.append(Budget(measure, at, origin))
    if not budgets:
        measure, why = default_measure(studies, trials)
        at, origin = default_at(measure, studies, trials)
        budgets.append(Budget(measure, at, f"{origin}; measure: {why}"))
        if measure != "wall":
            hours = _common(_param(studies, "max_hours"))
            if hours is not None or time_is_the_budget(studies, trials):
                at, origin = default_at("wall", studies, trials)
                budgets.append(Budget("wall", at, origin))
            else:
                notes.append("No comparison at equal active study time: these studies were not budgeted in seconds "
                             "and name no study.max_hours, so their time measures the machine's load (and on the "
                             "simulated launcher each trial's real start-up) as much as the searcher (ask for one "
                             "with --budget wall=HOURS).")
    for b in budgets:
        if not b.at > 0:
            raise BudgetError(f"the {b.measure} budget is {b.at:g} ({b.origin}): nothing to compare at")
    return budgets, notes


def kept_by_arm(per_study: pd.DataFrame, budget: Budget) -> pd.DataFrame:
    """Per arm: studies, trials kept by the cut out of those finished, and the studies that
    stopped short of the budget (compared with what they had)."""
    rows = []
    kept, total, reached = f"kept_{budget.measure}", "trials", f"reached_{budget.measure}"
    for arm, g in per_study.groupby("arm", sort=True):
        short = g[~g[reached].fillna(False).astype(bool)]
        rows.append({"arm": arm, "studies": len(g), "trials kept": int(g[kept].fillna(0).sum()),
                     "trials finished": int(g[total].fillna(0).sum()),
                     "short of the budget": ", ".join(f"seed {_number(s)}" for s in short["seed"]) or "-"})
    return pd.DataFrame(rows).set_index("arm")
