"""Who watches a study, and what they are told: the loop's callback protocol (Syne Tune's TunerCallback).

The loop knows its observers only through this class, so the MLflow mirror, the live display, and
anything added later (a webhook, a notebook widget) plug in without the loop naming them. Every
hook is called from the loop's thread after the journal has the event; an observer must return
quickly (the mirror queues work for its own thread) and must not raise: `Observers` logs and
swallows what one raises, so a broken display never costs a trial.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.records import Result, Trial

if TYPE_CHECKING:  # the loop's own types; observers only read them
    from study.loop import StopRules, StudyState

log = logging.getLogger("arena.observers")

# Seconds since the study started: submitted, started, finished (None when unknown).
Times = dict[str, float | None]


class StopKind(StrEnum):
    """Why a study stopped. The human reason (`StudyState.stop_reason`) says more; this decides."""

    MAX_TRIALS = "max_trials"
    MAX_HOURS = "max_hours"
    TARGET = "target"
    INTERRUPTED = "interrupted"  # Ctrl-C: the parent run ends KILLED
    SEARCHER_DONE = "searcher_done"
    SEARCHER_ERROR = "searcher_error"
    NO_SLOTS = "no_slots"
    STORAGE = "storage"  # the study's own disk failed: the parent run ends FAILED
    BASELINE_FAILED = "baseline_failed"  # the baseline cannot score: every candidate would fail (study/baseline.py)


@dataclass
class StudyEnd:
    """What the runner hands the observers when the study is over."""

    stop: StopKind | None
    reason: str
    failed: bool = False  # the loop died of an exception (a storage fault, a bug)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    artifact_dirs: list[Path] = field(default_factory=list)
    description: str | None = None


class StudyObserver:
    """Override the hooks you need; each default does nothing."""

    def on_start(self, state: StudyState, resumed: list[tuple[Trial, Result, Times]]) -> None:
        """Once, after the journal replay and before the first new trial; `resumed` is every trial
        the journal already had (empty for a new study), with its times."""

    def on_tick(self, state: StudyState, rules: StopRules) -> None:
        """Every turn of the loop (a few times a second): redraw."""

    def on_trial_finished(self, trial: Trial, result: Result, times: Times) -> None:
        """One trial finished (its result is stamped and journaled)."""

    def on_new_best(self, index: int, trial: Trial, result: Result) -> None:
        """`trial` is the new best; `index` is its position among finished trials."""

    def on_end(self, state: StudyState, end: StudyEnd) -> None:
        """The study is over: the runner has closed the launcher and the searcher."""


class Observers(StudyObserver):
    """Several observers as one, each shielded from the others' failures."""

    def __init__(self, observers: list[StudyObserver] | None = None):
        self.observers = [o for o in observers or [] if o is not None]

    def _each(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception as e:  # noqa: BLE001 - an observer's bug must not end the study
                log.warning("%s.%s failed: %s: %s", type(observer).__name__, hook, type(e).__name__, e)

    def on_start(self, state, resumed):
        self._each("on_start", state, resumed)

    def on_tick(self, state, rules):
        self._each("on_tick", state, rules)

    def on_trial_finished(self, trial, result, times):
        self._each("on_trial_finished", trial, result, times)

    def on_new_best(self, index, trial, result):
        self._each("on_new_best", index, trial, result)

    def on_end(self, state, end):
        self._each("on_end", state, end)
