"""The ground floor: the two interfaces the loop drives (Searcher, Launcher) and what they are handed.

The loop, the runner and every plugin import from here, and this module imports only the records,
the trial-directory contract and the objective's knob parser. So `searchers/` and `launchers/`
never import each other, and `study/` never imports a plugin (Hydra instantiates them by name).

Contracts a plugin can rely on, and must keep:

- The loop calls a searcher from one thread at a time (`setup`, `ask`, `tell`, `summary`,
  `close`), so a searcher need not be thread-safe. `ask` may run on a worker thread while trials
  finish; results that arrive meanwhile are told once it returns.
- A launcher's `submit`, `wait`, `cancel`, `adopt`, `slots`, `now` and `close` are called from the
  loop's thread only; a launcher that runs trials on threads of its own guards its own state.
- Records handed to a plugin are the loop's: a searcher reads `SearchContext.history` through a
  read-only view and never mutates a Trial or Result; a launcher returns a *new* Result per trial.
- Who stamps what: the harness writes the measured numbers; a launcher may set only what it alone
  knows (when the trial really started, `host`, a virtual clock's times, `extra`); the loop stamps
  `slot`, `device_kind`, `started_at`, `finished_at` and `queue_seconds` wherever they are unset.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from study.records import Candidate, Result, Trial
from train.knobs import KnobError, read_knobs, write_knobs

# The repository: what goes on a trial's PYTHONPATH, where the baseline train.py and git live.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# read_knobs/write_knobs/KnobError are the objective's knob parser (train/knobs.py), re-exported so a
# searcher depends on this interface, not on where the objective keeps it.
__all__ = ["PROJECT_ROOT", "KnobError", "read_knobs", "write_knobs", "HistoryView", "SearchContext", "Searcher",
           "Slot", "LauncherError", "Launcher"]


# -- searchers ----------------------------------------------------------------------------------------
class HistoryView(Sequence):
    """The loop's list of finished (trial, result) pairs, readable but not writable: a searcher sees
    every trial as it lands without a copy per ask, and cannot change what the loop recorded."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[Trial, Result]]):
        self._items = items

    @overload
    def __getitem__(self, i: int) -> tuple[Trial, Result]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[Trial, Result]]: ...
    def __getitem__(self, i):
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)


@dataclass
class SearchContext:
    """What a searcher may know about the study. `space` maps knob -> spec dict (type, low, high,
    log, levels, choices; see conf/space/); `device_kinds` maps kind -> how many slots and their
    relative speed, so an agent never has to guess which hardware it got. `history` is read-only
    and grows as trials finish; `in_flight` is refreshed before every ask."""

    baseline_source: str
    baseline_knobs: dict[str, Any]
    space: dict[str, dict[str, Any]]
    seed: int
    study_dir: str
    objective: dict[str, Any]
    device_kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: Sequence[tuple[Trial, Result]] = field(default_factory=list)
    in_flight: list[Trial] = field(default_factory=list)

    def best(self) -> tuple[Trial, Result] | None:
        done = [(t, r) for t, r in self.history if r.ok]
        return min(done, key=lambda tr: tr[1].score()) if done else None

    def best_score(self) -> float:
        b = self.best()
        return b[1].score() if b else math.inf

    # Knobs are the objective's (train/knobs.py); a searcher reaches them here so it depends on the
    # study's interface, not on where the objective keeps its parser.
    @staticmethod
    def knobs_of(source: str) -> dict[str, Any]:
        """The knob values a train.py sets; KnobError if it does not parse."""
        return read_knobs(source)

    def with_knobs(self, values: dict[str, Any], source: str | None = None) -> str:
        """`source` (the baseline by default) with `values` written into its knobs, every other byte
        kept; KnobError for an unknown knob or a value that is not a literal."""
        return write_knobs(self.baseline_source if source is None else source, values)


class Searcher(ABC):
    """Proposes candidates and learns from results: Optuna's ask/tell, sized to free slots. A
    searcher never sees a launcher. It must rebuild its state from `tell` alone, because a resumed
    study replays the journal through `tell`. Subclasses set `name`."""

    name: str = "base"

    def setup(self, ctx: SearchContext) -> None:
        """Called once before the first ask (and before the journal replay on resume). Raise
        ValueError with one line for bad settings: the study reports it before any compute."""
        self.ctx = ctx

    @abstractmethod
    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        """Up to `n` new candidates; fewer, or none yet (a grid waiting for a wave), is fine. May
        block (an agent thinking): the loop runs it beside the trials in flight."""

    def tell(self, trial: Trial, result: Result) -> None:
        """Learn from one finished trial. Failures arrive with `result.score() == inf`."""

    def done(self) -> bool:
        """True when the searcher has nothing more to propose (grid exhausted, budget spent)."""
        return False

    def random_start(self) -> int | None:
        """How many first trials it draws at random before it models anything (an Optuna sampler's
        start-up), so the study's banner can say why early trials look unguided; None if none."""
        return None

    def summary(self) -> dict[str, Any]:
        """Numbers the study logs on its parent run at the end (e.g. agent tokens and dollars)."""
        return {}

    def close(self) -> None:
        pass


# -- launchers ----------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One place a trial can run. `speed` is relative throughput (1.0 = the reference kind), used
    by the simulated clock and told to agents."""

    name: str
    device_kind: str = "cpu"
    speed: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


class LauncherError(RuntimeError):
    """Bad launcher configuration or an unusable backend: raised before anything is submitted."""


class Launcher(ABC):
    """Runs what it is given: submitit's small Executor/Job API, made asynchronous. The loop owns the
    clock and the slots' bookkeeping. A trial's directory already holds the contract's TRAIN_FILE and
    TRIAL_FILE when `submit` is called; wherever the trial runs, the harness writes RESULT_FILE and
    LOG_FILE there, and the launcher turns that into a Result (or an infrastructure status when the
    harness never got to write one). A failing trial is a Result, never an exception."""

    name: str = "base"
    # True when `now()` is a simulated clock; results then say so.
    simulated_time: bool = False

    def start(self) -> None:
        """Validate the config and bring up what the slots need; raise LauncherError with one
        clear line if the backend cannot work. Nothing is submitted yet."""

    @abstractmethod
    def slots(self) -> list[Slot]:
        """The slots trials may run on now; re-read every turn, so a slot can disappear for good."""

    @abstractmethod
    def submit(self, trial: Trial, slot: Slot) -> None:
        """Start `trial` on `slot` and return at once."""

    @abstractmethod
    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        """Results of trials that finished since the last call, as (trial_id, result); waits at
        most `timeout` seconds for the first one, returns [] if none."""

    @abstractmethod
    def cancel(self, trial_id: str) -> None:
        """Stop a trial; its result (status `cancelled`) still comes back through `wait`."""

    def adopt(self, trial: Trial, slot: Slot) -> bool:
        """On resume: re-attach to a trial the journal says was in flight. Return True if the
        launcher can still collect its result (e.g. a Slurm job still running); False means the
        loop re-runs it."""
        return False

    def now(self) -> float:
        """Seconds on the study's clock. Real time unless the launcher simulates it."""
        return time.time()

    def advance(self, seconds: float) -> None:
        """The searcher just spent `seconds` of real time thinking (an `ask`). A real clock has
        already moved; a simulated clock adds them, so agent latency is real time on the virtual
        clock. Under a simulated clock the loop calls `ask` synchronously, then this."""

    def close(self, cancel_running: bool = True) -> None:
        pass
