"""The baseline within a study: which trials ran it, what it scored, and when its failure ends the study.

A trial runs the baseline when its train.py is the study's baseline, byte for byte (TPE's enqueued
trial 0, a grid's or greedy's first point, the agent's noise seeds). Every candidate starts from
that code, so a baseline that cannot score (a broken `objective.knobs`, a corpus that does not fit
it) means every trial would fail the same way: the study stops at its first failure instead of
burning the rest of its budget, and a resume of such a study is refused before any compute.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from study.records import INFRA_STATUSES, NO_VERDICT, Candidate, Result, Trial


def is_baseline(candidate: Candidate, baseline_source: str) -> bool:
    return candidate.source == baseline_source


def failed_baseline(history: list[tuple[Trial, Result]], baseline_source: str) -> tuple[Trial, Result] | None:
    """The first measured failure of the baseline, when no run of the baseline has scored. A
    harness killed outright (an operator, the OOM killer, a backstop) wrote no verdict on the code:
    that failure is the trial's, not the baseline's, and the study goes on."""
    runs = [(t, r) for t, r in history if is_baseline(t.candidate, baseline_source)]
    if any(r.ok for _, r in runs):
        return None
    return next(((t, r) for t, r in runs if r.status not in INFRA_STATUSES and not r.extra.get(NO_VERDICT)), None)


def failure_line(trial: Trial, result: Result, study_dir: str | Path) -> str:
    """One line: the baseline's status and the exception's own message, and what to do."""
    return (f"the baseline ({trial.trial_id}) ended {result.status}: {result.why()}; the study stopped, "
            f"since every candidate starts from that code. Fix it, then start over "
            f"(another study.name, or remove {study_dir})")


def baseline_score(history: list[tuple[Trial, Result]], baseline_source: str) -> tuple[float, int] | None:
    """The baseline's val_bpb in this study (the mean of its whole-budget runs) and how many runs."""
    scores = [r.val_bpb for t, r in history
              if r.ok and t.candidate.full_budget and is_baseline(t.candidate, baseline_source)]
    return (statistics.fmean(scores), len(scores)) if scores else None
