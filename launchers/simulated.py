"""N virtual slots on one CPU: real trials, a simulated clock. For scaling studies (16 GPUs vs 1)
that a laptop can run: the objective is real training through the harness; only time is virtual.

The clock is a discrete-event schedule. A trial starts on its slot at the virtual time it is
submitted. Its virtual duration is its virtual training time plus its real fixed overhead
(result total_seconds - training_seconds: start-up, data, evaluation):

- virtual training time = the real budget it got, spent at the slot's speed. A slot of speed 1.08
  gets 1.08x the nominal budget in its trial spec (more steps, tokens or seconds, like an H200 doing ~8%
  more work in the same 5 minutes), and spends it in the nominal time. With a `steps`/`tokens`
  budget, `seconds_per_budget_unit` says what one step (or token) costs on a speed-1.0 slot, which
  keeps the clock free of CPU noise; left null, the trial's measured training_seconds stand in.
- A trial that stops early (crash, nan) is charged only the part of its budget it used, so a
  failure frees its slot early, as it would on a real GPU.

Trials really run `real_workers` at a time (default 1, so CPU timings are not disturbed), in
submission order. Results are released strictly in virtual-time order: the earliest finished
result goes out only once no trial still running for real could finish before it in virtual time.
A failure can end a trial at any moment after it starts, so the only safe bound for a trial still
running for real is its virtual start; with real_workers=1 that costs nothing (the one worker is
busy whenever anything is left to run), with more workers it only speeds up waves of submissions.
`assume_full_budget: true` bounds a running trial by its full budget instead, so the loop runs
ahead on the virtual clock and several real workers stay busy; a trial that then fails earlier
than its budget is charged until the virtual time its result could still be placed
(result extra `clamped_seconds` says by how much). Each `wait` releases one virtual instant, so
the loop refills a freed slot at the time it freed.

Under this clock the loop calls `ask` in line and then `advance(seconds it took)`, so agent
thinking time is real time on the virtual clock. Every result carries queue_seconds=0, virtual
started_at/finished_at, and extra time_mode="simulated".
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from launchers.base import harness_env, kill_group, run_harness
from study.core import Launcher, LauncherError, Slot
from study.records import Result, Trial
from train.contract import TRIAL_FILE

SLOT_KEYS = {"kind", "count", "speed"}

# runner(trial_dir, trial, slot) -> Result: what really runs a trial (the harness, or a test's fake).
Runner = Callable[[Path, Trial, Slot], Result]


@dataclass
class _InFlight:
    trial: Trial
    slot: Slot
    v_start: float
    future: Future
    lower_bound: float  # the earliest virtual finish possible while it still runs for real
    v_finish: float | None = None  # known once the trial really finished (or was cancelled)
    result: Result | None = None
    cancelled_at: float | None = None
    popen: subprocess.Popen | None = None


class SimulatedLauncher(Launcher):
    name = "simulated"
    simulated_time = True

    def __init__(self, slots: int | list[dict] = 16, kind: str = "H100", real_workers: int = 1,
                 seconds_per_budget_unit: float | None = None, assume_full_budget: bool = False,
                 threads_per_trial: int | None = None, name: str = "simulated", python: str | None = None,
                 runner: Runner | None = None):
        self.requested_slots = slots
        self.kind = kind
        self.real_workers = real_workers
        self.seconds_per_budget_unit = seconds_per_budget_unit
        self.assume_full_budget = assume_full_budget
        self.threads_per_trial = threads_per_trial
        self.python = python
        self._runner = runner or self._run_harness
        self._slots: list[Slot] = []
        self._clock = 0.0
        self._released_until = 0.0  # results up to this virtual time have gone out
        self._flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._just_thought = False  # advance() since the last wait
        self._gave_way = False  # a wait already returned early at this virtual instant

    # -- setup --------------------------------------------------------------------------------------
    def start(self) -> None:
        if not isinstance(self.real_workers, int) or self.real_workers < 1:
            raise LauncherError(f"launcher.real_workers must be an integer >= 1, not {self.real_workers!r}")
        spbu = self.seconds_per_budget_unit
        if spbu is not None and not (isinstance(spbu, (int, float)) and spbu > 0):
            raise LauncherError(f"launcher.seconds_per_budget_unit must be > 0 or null, not {spbu!r}")
        self._slots = self._parse_slots(self.requested_slots)
        cores = len(os.sched_getaffinity(0))
        self.threads_per_trial = self.threads_per_trial or max(1, cores // self.real_workers)
        self._pool = ThreadPoolExecutor(max_workers=self.real_workers, thread_name_prefix="sim-trial")

    def _parse_slots(self, spec) -> list[Slot]:
        """`16`, or a list of {kind, count, speed} groups (e.g. 13 x H100 at 1.0 + 3 x H200 at 1.08)."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            if spec < 1:
                raise LauncherError(f"launcher.slots must be >= 1, not {spec}")
            spec = [{"kind": self.kind, "count": spec, "speed": 1.0}]
        if not isinstance(spec, (list, tuple)) or not spec:
            raise LauncherError(f"launcher.slots must be a number or a list of {{kind, count, speed}}, not {spec!r}")
        slots = []
        for group in spec:
            if not isinstance(group, dict) or set(group) - SLOT_KEYS or "kind" not in group:
                raise LauncherError(f"launcher.slots entry must be {{kind, count, speed}}, not {group!r}")
            count, speed = group.get("count", 1), group.get("speed", 1.0)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise LauncherError(f"launcher.slots: count must be an integer >= 1, not {count!r}")
            if not isinstance(speed, (int, float)) or isinstance(speed, bool) or speed <= 0:
                raise LauncherError(f"launcher.slots: speed must be a number > 0, not {speed!r}")
            kind = str(group["kind"])
            for _ in range(count):
                n = sum(s.device_kind == kind for s in slots)
                slots.append(Slot(name=f"{kind.lower()}-{n}", device_kind=kind, speed=float(speed),
                                  info={"simulated": True}))
        return slots

    def slots(self) -> list[Slot]:
        if not self._slots:
            self.start()
        return list(self._slots)

    # -- the clock ----------------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock

    def advance(self, seconds: float) -> None:
        self._clock += max(0.0, float(seconds))
        self._just_thought = True

    # -- running ------------------------------------------------------------------------------------
    def submit(self, trial: Trial, slot: Slot) -> None:
        if self._pool is None:
            self.start()
        real_budget = _scale_budget(Path(trial.directory) / TRIAL_FILE, slot.speed)
        bound = self._clock
        if self.assume_full_budget:
            bound += self.budget_seconds(trial.objective["budget_kind"], real_budget, slot)
        entry = _InFlight(trial=trial, slot=slot, v_start=self._clock, future=Future(), lower_bound=bound)
        self._flight[trial.trial_id] = entry
        entry.future = self._pool.submit(self._really_run, entry)

    def _really_run(self, entry: _InFlight) -> tuple[Result, float]:
        started = time.monotonic()
        try:
            result = self._runner(Path(entry.trial.directory), entry.trial, entry.slot)
        except Exception as e:  # noqa: BLE001 - a runner bug is this trial's crash, not the study's
            result = Result(status="crash", reason=f"launcher failed to run the trial: {type(e).__name__}: {e}")
        return result, time.monotonic() - started

    def _run_harness(self, trial_dir: Path, trial: Trial, slot: Slot) -> Result:
        """The real run: the harness to completion, as any launcher runs it; only the clock is ours."""
        entry = self._flight[trial.trial_id]
        env = harness_env(threads=self.threads_per_trial, gpus="")
        limit = float(json.loads((trial_dir / TRIAL_FILE).read_text())["objective"]["hard_limit_s"])

        def started(popen: subprocess.Popen) -> None:
            with self._lock:
                entry.popen = popen
                if entry.cancelled_at is not None:  # cancelled while it was starting
                    kill_group(popen.pid)

        if entry.cancelled_at is not None:
            return Result(status="cancelled", reason="cancelled by the study")
        with open(trial_dir / "stdout.log", "ab") as out:
            return run_harness(trial_dir, env, python=self.python, limit_s=limit, started=started, stdout=out)

    def wait(self, timeout: float) -> list[tuple[str, Result]]:
        if self._just_thought and not self._gave_way:
            # The loop asks, charges the thinking (advance), then waits: give it one turn to submit
            # what the searcher just proposed at the instant thinking ended, before the clock moves
            # to the next completion. Once per instant, so a searcher with nothing to propose
            # cannot keep the clock from moving.
            self._just_thought, self._gave_way = False, True
            return []
        self._just_thought = False
        deadline = time.monotonic() + timeout
        while True:
            self._resolve_finished()
            released = self._release_next_instant()
            left = deadline - time.monotonic()
            if released or left <= 0:
                return released
            running = [e.future for e in self._flight.values() if e.v_finish is None]
            if running:
                wait_futures(running, timeout=left, return_when=FIRST_COMPLETED)
            else:
                time.sleep(left)

    def _resolve_finished(self) -> None:
        """Give every trial that really finished its virtual finish time."""
        for entry in self._flight.values():
            if entry.v_finish is not None or not entry.future.done():
                continue
            result, real_seconds = entry.future.result()
            if entry.cancelled_at is not None:
                result = Result(status="cancelled", reason="cancelled by the study")
                entry.v_finish = entry.cancelled_at
            else:
                entry.v_finish = entry.v_start + self.virtual_seconds(result, entry.trial, entry.slot, real_seconds)
                if entry.v_finish < self._released_until:  # only under assume_full_budget: it failed early
                    result.extra["clamped_seconds"] = round(self._released_until - entry.v_finish, 3)
                    entry.v_finish = self._released_until
            result.extra.update(real_seconds=round(real_seconds, 3), speed=entry.slot.speed,
                                nominal_budget=entry.trial.objective.get("budget"))
            entry.result = result

    def _release_next_instant(self) -> list[tuple[str, Result]]:
        """The results finishing at the earliest virtual time, if nothing still running could
        finish before them; the clock moves there."""
        known = [e for e in self._flight.values() if e.v_finish is not None]
        if not known:
            return []
        first = min(e.v_finish for e in known)
        bounds = [e.lower_bound for e in self._flight.values() if e.v_finish is None]
        if bounds and min(bounds) < first:
            return []
        self._clock = max(self._clock, first)
        self._released_until = first
        self._gave_way = False
        released = []
        for entry in sorted(known, key=lambda e: (e.v_finish, e.trial.index)):
            if entry.v_finish > first:
                break
            del self._flight[entry.trial.trial_id]
            released.append((entry.trial.trial_id, self._stamp(entry)))
        return released

    def _stamp(self, entry: _InFlight) -> Result:
        """The virtual times, which only this clock knows; the loop stamps slot and device."""
        result = entry.result
        result.started_at = entry.v_start
        result.finished_at = entry.v_finish
        result.extra.update(time_mode="simulated", virtual_seconds=round(entry.v_finish - entry.v_start, 3))
        return result

    def virtual_seconds(self, result: Result, trial: Trial, slot: Slot, real_seconds: float) -> float:
        """Virtual training time (the part of the nominal budget's time this trial used) plus its
        real fixed overhead."""
        training = result.training_seconds or 0.0
        total = result.total_seconds if result.total_seconds is not None else real_seconds
        overhead = max(0.0, total - training)
        kind = trial.objective.get("budget_kind")
        if kind == "seconds" or self.seconds_per_budget_unit is None:
            return overhead + training / slot.speed
        done = result.num_steps if kind == "steps" else result.tokens
        return overhead + self.budget_seconds(kind, done or 0, slot)

    def budget_seconds(self, kind: str, amount: float, slot: Slot) -> float:
        """Virtual seconds that `amount` of real budget takes on `slot` (0 when unknowable: a
        steps/tokens budget without seconds_per_budget_unit)."""
        if kind == "seconds":
            return amount / slot.speed
        return amount / slot.speed * (self.seconds_per_budget_unit or 0.0)

    def cancel(self, trial_id: str) -> None:
        entry = self._flight.get(trial_id)
        if entry is None or entry.cancelled_at is not None:
            return
        if entry.v_finish is not None and entry.v_finish <= self._clock:
            return  # it already finished on the virtual clock; its result stands
        with self._lock:
            entry.cancelled_at = max(self._clock, entry.v_start)
            if entry.v_finish is not None:
                entry.v_finish, entry.result = entry.cancelled_at, Result(status="cancelled", reason="cancelled by the study")
            elif entry.popen is not None:
                kill_group(entry.popen.pid)
            entry.future.cancel()
        if entry.future.cancelled():
            entry.v_finish = entry.cancelled_at
            entry.result = Result(status="cancelled", reason="cancelled by the study")

    def close(self, cancel_running: bool = True) -> None:
        if cancel_running:
            for trial_id in list(self._flight):
                self.cancel(trial_id)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _scale_budget(spec_path: Path, speed: float) -> float:
    """A faster slot does proportionally more work in the same time: scale the real budget (and
    the hard limit, so the larger budget still fits) in the trial's own spec. Returns the
    real budget."""
    spec = json.loads(spec_path.read_text())
    objective = spec["objective"]
    if speed == 1.0:
        return objective["budget"]
    budget = objective["budget"] * speed
    objective["budget"] = budget if objective["budget_kind"] == "seconds" else max(1, int(round(budget)))
    objective["hard_limit_s"] = objective["hard_limit_s"] * max(1.0, speed)
    tmp = spec_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, spec_path)
    return objective["budget"]
