"""The asynchronous study loop: keep every slot busy, let the searcher think beside the trials.

Hydra's sweepers are batch-synchronous and its submitit launcher blocks, so this loop is ours:
whenever a slot frees it is refilled at once from candidates already proposed; `ask` runs on a
worker thread (an agent may think for minutes) while results keep being collected. Every event goes
to the journal first (the source of truth), then to the observers (study/observers.py: the MLflow
mirror, the live display), which the loop knows only through that protocol.
Searcher calls are serialised: results that arrive while an `ask` is running are told to the
searcher as soon as it returns, so a searcher never needs to be thread-safe.
"""
from __future__ import annotations

from collections import Counter
import logging
import re
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from study.core import HistoryView, Launcher, SearchContext, Searcher, Slot
from study import storage
from study.baseline import failed_baseline, failure_line, is_baseline
from study.clock import StudyClock
from study.journal import Event, Journal, JournalState
from study.observers import Observers, StopKind, StudyObserver
from study.records import INFRA_STATUSES, Candidate, Result, Trial, scaled_objective
from study.trialdir import write_trial_dir
from train.contract import TRAIN_FILE

log = logging.getLogger("arena.loop")

@dataclass
class StopRules:
    max_trials: int | None = None
    max_hours: float | None = None
    target_val_bpb: float | None = None
    on_stop: str = "cancel"  # what a time limit, a reached target or Ctrl-C does to trials in flight
    # A trial the infrastructure ends (an operator's scancel, a lost node) is not a measurement: it
    # runs again, up to this many times in one session, before it is recorded as it ended (and the
    # searcher hears of it). 1: an operator's cancel is final. A stop of the study itself (a time
    # limit, Ctrl-C) never counts: those trials run again on resume.
    max_attempts: int = 3

    def __post_init__(self):
        if self.on_stop not in ("cancel", "finish"):
            raise ValueError(f"study.on_stop must be 'cancel' or 'finish', not {self.on_stop!r}")
        if self.max_attempts < 1:
            raise ValueError(f"study.max_attempts must be >= 1, not {self.max_attempts}")
        if self.max_trials is not None and self.max_trials < 1:
            raise ValueError(f"study.max_trials must be >= 1, not {self.max_trials}")
        if self.max_hours is not None and self.max_hours <= 0:
            raise ValueError(f"study.max_hours must be > 0, not {self.max_hours}")


@dataclass
class Running:
    trial: Trial
    slot: Slot


@dataclass
class StudyState:
    """What the display and the end-of-study summary read."""

    slots: list[Slot] = field(default_factory=list)
    running: dict[str, Running] = field(default_factory=dict)
    history: list[tuple[Trial, Result]] = field(default_factory=list)
    best: tuple[Trial, Result] | None = None
    elapsed: float = 0.0  # study time (study/clock.py): idle gaps between sessions left out
    clock: StudyClock = field(default_factory=StudyClock)
    thinking: bool = False
    stop: StopKind | None = None  # why the study stopped; `stop_reason` says it for people
    stop_reason: str | None = None


class StudyLoop:
    def __init__(self, *, searcher: Searcher, launcher: Launcher, ctx: SearchContext, objective: dict,
                 study_dir: Path, seed: int, rules: StopRules, observers: list[StudyObserver] | None = None):
        self.searcher = searcher
        self.launcher = launcher
        self.ctx = ctx
        self.objective = objective
        self.study_dir = Path(study_dir)
        self.seed = seed
        self.rules = rules
        self.observers = Observers(observers)
        self.journal_path = self.study_dir / "journal.jsonl"
        self.state = StudyState(clock=StudyClock(origin=launcher.now()))  # rebuilt from the journal in run()
        self._history_view = HistoryView(self.state.history)
        self.pending: list[Candidate] = []
        self._pending_kinds: Counter = Counter()  # device kinds the pending candidates name, to skip a scan
        self._slot_index: tuple = (None, {})  # (the slot list it was built from, slots by name)
        self.reruns: list[Trial] = []  # measured by nobody yet (cancelled, lost, orphaned): run again first
        self._session_attempts: dict[str, int] = {}
        self.untold: list[tuple[Trial, Result]] = []
        self.next_index = 0  # the next trial id; ids a kill left unused are skipped, never reused
        self.submitted = 0  # distinct trials submitted: what max_trials counts (a skipped id is no trial)
        self.clock_origin = 0.0
        self._ask_future: Future | None = None
        self._ask_started = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="searcher-ask")
        self._interrupts = 0  # Ctrl-Cs received (the handler counts them) ...
        self._interrupts_taken = 0  # ... and acted on (the loop, at its next turn)
        self._stop_submitting = False

    # -- public ---------------------------------------------------------------------------------
    def run(self, header: dict, setup_searcher: bool = True) -> StudyState:
        journal_state = JournalState.load(self.journal_path)
        self.journal = Journal(self.journal_path)
        self.state.slots = self.launcher.slots()
        if journal_state.header is None:
            self.clock_origin = self.launcher.now()
            self.journal.append(Event.STUDY, clock_origin=self.clock_origin, **header)
        else:
            self.clock_origin = journal_state.header["clock_origin"]
            if self.launcher.simulated_time:  # a virtual clock restarts at 0: carry on from the last event
                last = [t.submitted_at or 0.0 for t in journal_state.trials.values()]
                last += [(r.finished_at or 0.0) - self.clock_origin for r in journal_state.results.values()]
                self.launcher.advance(max(last, default=0.0))
            self.journal.append(Event.RESUMED, at=self.launcher.now())
        self.state.clock = StudyClock.from_journal(Journal.read(self.journal_path), self.launcher.simulated_time)
        if setup_searcher:
            self.searcher.setup(self.ctx)
        self._replay(journal_state)
        previous = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        try:
            self._loop()
        except OSError as e:  # the journal, a trial folder or the best link could not be written
            why = storage.describe(e, self.study_dir) or storage.problem(self.study_dir)
            if why is None:
                raise
            self.state.stop, self.state.stop_reason = StopKind.STORAGE, why
            raise storage.StudyStorageError(why) from e
        except storage.StudyStorageError as e:
            self.state.stop, self.state.stop_reason = StopKind.STORAGE, str(e)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._pool.shutdown(wait=False, cancel_futures=True)
            closing = self._close_journal()  # an error already on its way says why; this adds nothing
        if closing is not None:  # the study ended by itself, but its last lines may not be on disk
            why = storage.describe(closing, self.study_dir) or storage.problem(self.study_dir)
            if why is None:
                raise closing
            raise storage.StudyStorageError(f"{why}; the journal's last lines could not be written") from closing
        return self.state

    def _close_journal(self) -> OSError | None:
        """The `stopped` line and the final sync; the first failure is returned, not raised."""
        fault = None
        try:
            self.journal.append(Event.STOPPED, reason=self.state.stop_reason, kind=self.state.stop, at=self.now())
        except OSError as e:
            fault = e
        try:
            self.journal.close()
        except OSError as e:
            fault = fault or e
        return fault

    def now(self) -> float:
        """Seconds since the study started, on the launcher's clock (virtual when simulated)."""
        return self.launcher.now() - self.clock_origin

    def study_time(self) -> float:
        """Study seconds now: `now()` less the idle gaps between sessions (study/clock.py)."""
        return self.state.clock.active(self.launcher.now())

    # -- resume -----------------------------------------------------------------------------------
    def _replay(self, js: JournalState) -> None:
        """Tell the searcher everything the journal says finished, then adopt or re-run the
        trials that were in flight when the previous orchestrator died."""
        # Ids are never reused, even when the journal lost a line: the trials/ folder counts too.
        self.next_index = 1 + max([t.index for t in js.trials.values()] + _folder_indices(self.study_dir),
                                  default=-1)
        self.submitted = len(js.trials)
        for trial, result in js.finished():
            self._record(trial, result, notify=False)
        self.observers.on_start(self.state, [(t, r, self._times(t, r)) for t, r in self.state.history])
        slots = {s.name: s for s in self.state.slots}
        for trial in js.in_flight():
            slot = slots.get(trial.slot)
            if slot is not None and self.launcher.adopt(trial, slot):
                del slots[trial.slot]
                self.state.running[trial.trial_id] = Running(trial, slot)
                self.journal.append(Event.ADOPTED, trial_id=trial.trial_id, slot=slot.name)
                log.info("adopted %s still running on %s", trial.trial_id, slot.name)
            else:
                self.reruns.append(trial)
        self.reruns += js.to_rerun()  # cancelled or lost: never measured, so never told

    def _rerun(self, trial: Trial, slot: Slot) -> None:
        """Run a trial again in a folder of its own (`tNNNN-aK`): whatever the last attempt left
        behind, even a process still writing there, never mixes with this one."""
        trial.attempt += 1
        trial.slot, trial.device_kind = slot.name, slot.device_kind
        base = self.study_dir / "trials" / trial.trial_id
        trial.submitted_at = self.now()  # before the folder: its record carries it
        trial.directory = str(write_trial_dir(base.with_name(f"{trial.trial_id}-a{trial.attempt}"), trial))
        self.journal.append(Event.RESUBMITTED, trial=trial.to_dict())
        self.journal.append(Event.SUBMITTED, trial=trial.to_dict())
        self.state.running[trial.trial_id] = Running(trial, slot)
        self.launcher.submit(trial, slot)
        log.info("re-running %s (attempt %d; the last one was not measured)", trial.trial_id, trial.attempt)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.state.elapsed = self.study_time()
            self._check_stop()
            self._collect_ask()
            self._fill_slots()
            self._maybe_ask()
            self._fill_slots()  # what an in-line (simulated-clock) ask produced starts now
            if self._finished():
                break
            self.observers.on_tick(self.state, self.rules)
            asking = self._ask_future is not None
            for trial_id, result in self.launcher.wait(timeout=0.05 if asking else 0.5):
                self._on_result(trial_id, result)
        self.observers.on_tick(self.state, self.rules)

    def _slots_by_name(self) -> dict[str, Slot]:
        """The slots by name, rebuilt only when the launcher hands back a new list (a lookup per
        result was a scan of every slot)."""
        if self._slot_index[0] is not self.state.slots:
            self._slot_index = (self.state.slots, {s.name: s for s in self.state.slots})
        return self._slot_index[1]

    def _free_slots(self) -> list[Slot]:
        busy = {r.slot.name for r in self.state.running.values()}
        return [s for s in self.state.slots if s.name not in busy]

    def _budget_left(self) -> int:
        if self.rules.max_trials is None:
            return 1 << 30
        return max(0, self.rules.max_trials - self.submitted)

    def _fill_slots(self) -> None:
        # Re-read: a launcher may drop a slot for good (a cluster that cannot be relaunched).
        self.state.slots = self.launcher.slots()
        if self._stop_submitting:
            return
        kinds = {s.device_kind for s in self.state.slots}  # once per fill, not once per candidate
        for slot in self._free_slots():
            if self.reruns:  # already counted against max_trials
                self._rerun(self.reruns.pop(0), slot)
                continue
            if not self.pending or self._budget_left() <= 0:
                return
            candidate = self._take_candidate(slot, kinds)
            if candidate is not None:
                self._submit(candidate, slot)

    def _take_candidate(self, slot: Slot, kinds: set) -> Candidate | None:
        """The oldest candidate that asked for this slot's device kind, else the oldest that may run
        anywhere. A candidate that named a kind the launcher has (`kinds`) waits for it (a rung that
        confirms on the faster kind must not land on the slower one); one naming a kind it lacks runs
        anywhere. The first scan is skipped when no pending candidate names the slot's kind: scanning
        a long queue for every submission made the scheduler quadratic (27 of 95 s at 10,000 slots)."""
        tests = [lambda c: c.device_kind not in kinds]
        if slot.device_kind is None or self._pending_kinds[slot.device_kind]:
            tests.insert(0, lambda c: c.device_kind == slot.device_kind)
        for wanted in tests:
            for i, c in enumerate(self.pending):
                if wanted(c):
                    if c.device_kind is not None:
                        self._pending_kinds[c.device_kind] -= 1
                    return self.pending.pop(i)
        return None

    def _placeable(self, free: list[Slot]) -> int:
        """How many pending candidates may start on these free slots (one each at most)."""
        kinds = {s.device_kind for s in self.state.slots}
        free_kinds = [s.device_kind for s in free]
        count = 0
        for c in self.pending:
            kind = c.device_kind if c.device_kind in kinds else None
            if kind is None and free_kinds:
                free_kinds.pop()
                count += 1
            elif kind in free_kinds:
                free_kinds.remove(kind)
                count += 1
        return count

    def _submit(self, candidate: Candidate, slot: Slot) -> None:
        index = self.next_index
        self.next_index += 1
        self.submitted += 1
        objective = self.objective
        if candidate.budget_fraction is not None:
            objective = scaled_objective(objective, candidate.budget_fraction)
        trial = Trial(
            trial_id=f"t{index:04d}", index=index, candidate=candidate, objective=objective,
            seed=self.seed if candidate.seed is None else candidate.seed,
            slot=slot.name, device_kind=slot.device_kind,
        )
        trial.submitted_at = self.now()  # before the folder: its record carries it
        trial.directory = str(write_trial_dir(self.study_dir / "trials" / trial.trial_id, trial))
        self.journal.append(Event.SUBMITTED, trial=trial.to_dict())
        self.state.running[trial.trial_id] = Running(trial, slot)
        self.launcher.submit(trial, slot)

    def _maybe_ask(self) -> None:
        if self._ask_future is not None or self._stop_submitting or self.searcher.done():
            return
        # Ask for what can start now; candidates waiting for a busy kind never outnumber the slots.
        free = self._free_slots()
        wanted = min(len(free) - self._placeable(free) - len(self.reruns), self._budget_left() - len(self.pending),
                     len(self.state.slots) - len(self.pending))
        if wanted <= 0:
            return
        self._tell_untold()
        self.ctx.history = self._history_view  # live, read-only, no copy per ask
        self.ctx.in_flight = [r.trial for r in self.state.running.values()] + list(self.reruns)
        self._ask_started = time.time()
        if self.launcher.simulated_time:
            # Under a virtual clock, thinking time is charged explicitly, so ask in line.
            self._ask_future = Future()
            try:
                self._ask_future.set_result(self.searcher.ask(wanted, self.ctx))
            except Exception as e:  # noqa: BLE001
                self._ask_future.set_exception(e)
            self.launcher.advance(time.time() - self._ask_started)
        else:
            self._ask_future = self._pool.submit(self.searcher.ask, wanted, self.ctx)
        self.state.thinking = True
        self._collect_ask()

    def _collect_ask(self) -> None:
        fut = self._ask_future
        if fut is None or not fut.done():
            return
        self._ask_future = None
        self.state.thinking = False
        try:
            candidates = fut.result()
        except Exception as e:  # noqa: BLE001 - a searcher bug ends the searcher, not the study
            self._raise_if_storage(e)
            log.error("searcher.ask failed: %s: %s; no more candidates", type(e).__name__, e)
            self.journal.append(Event.SEARCHER_ERROR, error=f"{type(e).__name__}: {e}")
            self._stop_submitting = True
            self._stopped_because(StopKind.SEARCHER_ERROR, f"searcher error: {type(e).__name__}: {e}")
            candidates = []
        self.pending.extend(candidates or [])
        self._pending_kinds.update(c.device_kind for c in candidates or [] if c.device_kind is not None)
        self.journal.append(Event.ASKED, n=len(candidates or []), seconds=round(time.time() - self._ask_started, 3))
        self._tell_untold()

    def _tell_untold(self) -> None:
        if self._ask_future is not None:
            return
        while self.untold:
            trial, result = self.untold.pop(0)
            try:
                self.searcher.tell(trial, result)
            except Exception as e:  # noqa: BLE001
                self._raise_if_storage(e)
                log.error("searcher.tell(%s) failed: %s: %s", trial.trial_id, type(e).__name__, e)

    def _on_result(self, trial_id: str, result: Result) -> None:
        running = self.state.running.pop(trial_id, None)
        if running is None:
            return  # a late duplicate (e.g. cancelled twice)
        trial = running.trial
        # The slot as the launcher lists it now: a relaunched cluster may have another accelerator.
        slot = self._slots_by_name().get(running.slot.name, running.slot)
        stamp(result, trial, slot, now=self.launcher.now(), clock_origin=self.clock_origin)
        self.state.clock.ran(result.started_at, result.finished_at)  # an adopted trial ran through the gap
        if not result.ok and result.status not in INFRA_STATUSES:
            why = storage.problem(self.study_dir)  # the study's disk, not the candidate, may have failed
            if why:
                self.state.running[trial_id] = running  # still unmeasured: a resume runs it again
                raise storage.StudyStorageError(f"{why}; {trial_id} was not recorded and runs again on resume")
        if result.status in INFRA_STATUSES:
            attempts = self._session_attempts[trial_id] = self._session_attempts.get(trial_id, 0) + 1
            if self._stop_submitting or attempts < self.rules.max_attempts:
                # Not a measurement: the searcher never hears of it and it does not count; it runs
                # again now, or on resume if the study is stopping.
                self.journal.append(Event.FINISHED, trial_id=trial_id, result=result.to_dict())
                if not self._stop_submitting:
                    self.reruns.append(trial)
                log.info("%s ended %s (%s): not a measurement; it runs again", trial_id, result.status,
                         result.reason or "")
                return
            log.warning("%s ended %s %d times; recorded as it ended", trial_id, result.status, attempts)
            self.journal.append(Event.FINISHED, trial_id=trial_id, result=result.to_dict(), final=True)
        else:
            self.journal.append(Event.FINISHED, trial_id=trial_id, result=result.to_dict())
        self._record(trial, result, notify=True)
        self._stop_if_baseline_failed(trial)

    def _stop_if_baseline_failed(self, trial: Trial) -> None:
        """Every candidate starts from the baseline: if it cannot score, neither can they."""
        if self.state.stop is not None or not is_baseline(trial.candidate, self.ctx.baseline_source):
            return
        failed = failed_baseline(self.state.history, self.ctx.baseline_source)
        if failed:
            self._stop(StopKind.BASELINE_FAILED, failure_line(*failed, self.study_dir), cancel=True)

    def _raise_if_storage(self, e: Exception) -> None:
        """A searcher that failed writing its own state (Optuna's database) in the study folder is a
        storage fault: stop the study, do not blame the searcher or carry on without it."""
        why = storage.describe(e, self.study_dir) or storage.problem(self.study_dir)
        if why:
            raise storage.StudyStorageError(why) from e

    def _record(self, trial: Trial, result: Result, *, notify: bool) -> None:
        self.state.history.append((trial, result))
        self.untold.append((trial, result))
        self._tell_untold()
        # A shortened (rung) run screens candidates; only a run on the whole budget can be the best.
        improved = result.ok and trial.candidate.full_budget and (
            self.state.best is None or result.score() < self.state.best[1].score())
        if improved:
            self.state.best = (trial, result)
            self._mark_best(trial)
        if notify:
            self.observers.on_trial_finished(trial, result, self._times(trial, result))
            if improved:
                self.observers.on_new_best(len(self.state.history) - 1, trial, result)

    def _times(self, trial: Trial, result: Result) -> dict[str, float]:
        """When the trial was submitted, started and finished, in study time."""
        clock = self.state.clock
        return {
            "t_submitted": None if trial.submitted_at is None else clock.since_start(trial.submitted_at),
            "t_started": None if result.started_at is None else clock.active(result.started_at),
            "t_finished": None if result.finished_at is None else clock.active(result.finished_at),
        }

    def _mark_best(self, trial: Trial) -> None:
        """The best candidate's directory is always findable: `best` links to it."""
        link = self.study_dir / "best"
        tmp = self.study_dir / ".best.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("trials") / trial.trial_id)
        tmp.replace(link)
        shutil.copyfile(Path(trial.directory) / TRAIN_FILE, self.study_dir / "best_train.py")

    # -- stopping -------------------------------------------------------------------------------
    def _check_stop(self) -> None:
        self._take_interrupts()
        if self._stop_submitting:
            return
        r = self.rules
        if r.max_hours is not None and self.study_time() >= r.max_hours * 3600:
            self._stop(StopKind.MAX_HOURS, f"max_hours={r.max_hours} reached", cancel=r.on_stop == "cancel")
        elif r.target_val_bpb is not None and self.state.best and self.state.best[1].val_bpb <= r.target_val_bpb:
            self._stop(StopKind.TARGET, f"target val_bpb <= {r.target_val_bpb} reached by {self.state.best[0].trial_id}",
                       cancel=r.on_stop == "cancel")

    def _stop(self, kind: StopKind, reason: str, cancel: bool) -> None:
        self._stop_submitting = True
        self.state.stop, self.state.stop_reason = kind, reason
        self.pending.clear()
        self._pending_kinds.clear()
        log.info("stopping: %s (%s trials in flight)", reason, "cancelling" if cancel else "finishing")
        if cancel:
            for trial_id in list(self.state.running):
                self.launcher.cancel(trial_id)

    def _finished(self) -> bool:
        if self.state.running or (self.reruns and not self._stop_submitting and self.state.slots):
            return False
        if self._stop_submitting:
            return True
        if not self.state.slots:
            self._stopped_because(StopKind.NO_SLOTS, "the launcher has no slots left")
            return True
        if self._budget_left() <= 0:
            self._stopped_because(StopKind.MAX_TRIALS, f"max_trials={self.rules.max_trials} reached")
            return True
        if self._ask_future is None and not self.pending and self.searcher.done():
            self._stopped_because(StopKind.SEARCHER_DONE, "searcher has nothing more to propose")
            return True
        return False

    def _stopped_because(self, kind: StopKind, reason: str) -> None:
        """The first reason a study stops is the one it keeps."""
        if self.state.stop is None:
            self.state.stop, self.state.stop_reason = kind, reason

    def _on_sigint(self, signum, frame) -> None:
        """Only counted here; the loop acts on it at its next turn (`_take_interrupts`). Acting in
        the handler, which runs wherever the main thread happens to be, cancelled nothing of a
        trial the launcher was still starting (it did not know the trial yet), so that trial ran
        to the end and counted, and cleared the pending list under a loop that was reading it."""
        self._interrupts += 1

    def _take_interrupts(self) -> None:
        if self._interrupts == self._interrupts_taken:
            return
        first = self._interrupts_taken == 0 and self._interrupts == 1 and not self._stop_submitting
        self._interrupts_taken = self._interrupts
        if first:
            self._stop(StopKind.INTERRUPTED, "interrupted (Ctrl-C)", cancel=self.rules.on_stop == "cancel")
        else:
            self._stop(StopKind.INTERRUPTED, "interrupted twice (Ctrl-C): cancelling", cancel=True)


def _folder_indices(study_dir: Path) -> list[int]:
    """Indices of the trial folders on disk (`t0007`, `t0007-a2`)."""
    found = (re.match(r"t(\d+)", p.name) for p in (study_dir / "trials").glob("t*"))
    return [int(m.group(1)) for m in found if m]


def stamp(result: Result, trial: Trial, slot: Slot, *, now: float, clock_origin: float) -> Result:
    """Where and when, onto a launcher's result: the one place slot, device kind and queue time are
    set. `now` is the launcher's clock. A launcher that observed when the trial really ran (a Slurm
    job's start and end, a virtual clock) has set started_at/finished_at; otherwise the trial is taken
    to have started when it was submitted and to have ended now."""
    if result.finished_at is None:
        result.finished_at = now
    if result.started_at is None:
        result.started_at = trial.submitted_at + clock_origin
    result.queue_seconds = max(0.0, result.started_at - clock_origin - trial.submitted_at)
    result.slot = slot.name
    result.device_kind = slot.device_kind
    return result


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

