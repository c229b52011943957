"""The three records every part of the arena speaks: Candidate, Trial, Result.

Searchers produce candidates, the loop turns them into trials, launchers return results. They are
plain dataclasses that round-trip through JSON because the journal (the source of truth) and
the trial spec on a remote node must hold them exactly; nothing here imports a searcher, a launcher
or torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Outcomes of a trial, from the trial-directory contract (re-exported: records are where the rest of
# the arena looks for them). The harness statuses are the candidate's; `cancelled` and `lost` come
# from a launcher when the infrastructure (not the candidate) ended the trial. The harness also writes
# `cancelled` when its worker is stopped by SIGTERM/SIGINT from outside: a scheduler's cancel can
# reach the worker before it reaches the harness.
from train.contract import HARNESS_STATUSES, INFRA_STATUSES, STATUSES

__all__ = ["HARNESS_STATUSES", "INFRA_STATUSES", "STATUSES", "RESULT_NUMBERS", "NO_VERDICT", "Candidate", "Trial",
           "Result"]

# Set (true) in `extra` of a result a launcher made because the harness wrote none (killed outright,
# its node lost): the status is the launcher's, not the harness's verdict on the candidate's code.
NO_VERDICT = "no_harness_verdict"

# Numbers a result may carry; every one is logged under this same name in the journal and MLflow.
RESULT_NUMBERS = (
    "val_bpb",
    "training_seconds",
    "total_seconds",
    "num_steps",
    "tokens",
    "num_params",
    "peak_memory_mb",
    "mfu",
    "tokens_per_second",
    "queue_seconds",
    "budget",
    "agent_usd",
)


@dataclass
class Candidate:
    """One full `train.py` plus why it exists.

    `knobs` holds the knob values this candidate sets (all of them for classical searchers, the
    changed ones for an agent); `meta` is the searcher's private bookkeeping (an Optuna trial
    number, a grid index) and must be JSON-serialisable so a resumed study can hand it back.
    `budget_fraction` < 1 asks for a complete but shorter run (a successive-halving rung, see
    searchers/rungs.py): its score screens candidates and never counts as a result of the study.
    """

    source: str
    knobs: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    hypothesis: str = ""
    device_kind: str | None = None
    seed: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    budget_fraction: float | None = None

    @property
    def full_budget(self) -> bool:
        """A run on the study's whole budget: only these can be the study's best."""
        return self.budget_fraction is None or self.budget_fraction >= 1.0

    def to_dict(self) -> dict:
        return _shallow(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**{k: d[k] for k in _field_names(cls) if k in d})


@dataclass
class Trial:
    """One run of one candidate on one slot. `objective` is what the harness needs (budget kind
    and value, hard limit, data settings) and is written verbatim into the trial spec."""

    trial_id: str
    index: int
    candidate: Candidate
    objective: dict[str, Any]
    seed: int = 0
    directory: str = ""
    slot: str | None = None
    device_kind: str | None = None
    submitted_at: float | None = None  # seconds since study start (virtual under the simulator)
    attempt: int = 1  # a re-run (the last attempt was cancelled or lost) gets a folder of its own

    def to_dict(self) -> dict:
        d = _shallow(self)
        d["candidate"] = self.candidate.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        kw = {k: d[k] for k in _field_names(cls) if k in d}
        kw["candidate"] = Candidate.from_dict(d["candidate"])
        return cls(**kw)

    def harness_spec(self) -> dict:
        """What goes into the trial spec (TRIAL_FILE): everything the harness on a bare node needs."""
        return {
            "trial_id": self.trial_id,
            "seed": self.seed if self.candidate.seed is None else self.candidate.seed,
            "objective": self.objective,
        }


@dataclass
class Result:
    """What a trial produced. Harness fields follow the harness's RESULT_FILE; the
    launcher adds where and when (`slot`, `queue_seconds`, times since study start)."""

    status: str
    val_bpb: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    num_steps: int | None = None
    tokens: int | None = None
    num_params: int | None = None
    peak_memory_mb: float | None = None
    mfu: float | None = None
    tokens_per_second: float | None = None
    device: str | None = None
    device_kind: str | None = None
    host: str | None = None
    torch_version: str | None = None
    budget_kind: str | None = None
    budget: float | None = None
    error: str | None = None
    reason: str | None = None
    slot: str | None = None
    queue_seconds: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown trial status {self.status!r}; expected one of {STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.val_bpb is not None and math.isfinite(self.val_bpb)

    def why(self) -> str:
        """One line that says why this trial did not score: its reason, else the exception line of
        its error (not a traceback's header), else ''."""
        if self.reason:
            return " ".join(self.reason.split())
        return exception_line(self.error or "")

    def score(self) -> float:
        """The value a minimiser should see: val_bpb for a good trial, +inf for any failure, so a
        crash can never look like a good score."""
        return float(self.val_bpb) if self.ok else math.inf

    def to_dict(self) -> dict:
        return _shallow(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        names = _field_names(cls)
        kw = {k: d[k] for k in names if k in d}
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        kw["extra"] = extra
        return cls(**kw)

    def numbers(self) -> dict[str, float]:
        """Every finite number this result carries (fields and extra), for MLflow and analysis."""
        out = {}
        for k, v in {**self.extra, **self.to_dict()}.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                out[k] = float(v)
        return out


def exception_line(text: str, limit: int = 300) -> str:
    """The line of a Python traceback that names the exception and its message (the first line
    below the last frame), or the first line of a plain message. A tail cut from a longer traceback
    works too."""
    lines = text.strip().splitlines()
    prefix = "harness error: " if text.startswith("harness error: ") else ""
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    if frames:
        after = [line for line in lines[frames[-1] + 1:] if line.strip() and not line[0].isspace()]
        if after:
            return (prefix + after[0].strip())[:limit]
    plain = [line.strip() for line in lines if line.strip() and not line.startswith("Traceback (")]
    return plain[0][:limit] if plain else ""


def scaled_objective(objective: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The objective of a complete run on `fraction` of the budget. The schedules in train.py run
    on the fraction of *their* budget, so this is a shorter run done right, not a long one cut.
    The hard limit shrinks with it, but never below a minute (or the full limit, if less): start-up
    and evaluation take the same time on any budget."""
    if fraction >= 1.0:
        return objective
    scaled = dict(objective)
    budget = objective["budget"] * fraction
    scaled["budget"] = budget if objective["budget_kind"] == "seconds" else max(1, int(round(budget)))
    limit = objective["hard_limit_s"]
    per_unit = objective.get("hard_limit_per_unit_s")
    if per_unit:  # a limit derived from the budget (allowance + per unit) follows the shorter budget
        scaled["hard_limit_s"] = round(limit - (objective["budget"] - scaled["budget"]) * per_unit, 1)
    else:
        scaled["hard_limit_s"] = max(limit * fraction, min(limit, MIN_HARD_LIMIT_S))
    scaled["budget_fraction"] = fraction
    return scaled


# The least a shortened run's hard limit may be: a run's fixed costs do not shrink with its budget.
MIN_HARD_LIMIT_S = 60.0


def _shallow(record) -> dict:
    """A record as a dict for JSON, without dataclasses.asdict's deep copy (a hot path: the
    journal serialises every trial twice)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
