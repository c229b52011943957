"""In-memory stand-ins for the loop's unit tests (the real launchers have their own tests)."""
from __future__ import annotations

import threading
import time

from study.core import Launcher, Searcher, Slot
from study.records import Candidate, Result


class InstantLauncher(Launcher):
    """Trials finish after `durations[i]` real seconds with val_bpb from `score(candidate)` (None:
    a crash; a Result: that result, e.g. an infrastructure status)."""

    name = "instant"

    def __init__(self, n_slots: int, duration: float = 0.0, score=None):
        self._slots = [Slot(name=f"s{i}") for i in range(n_slots)]
        self.duration = duration
        self.score = score or (lambda c: 1.0)
        self.running: dict[str, tuple[float, Candidate]] = {}
        self.cancelled: list[str] = []
        self.submits: list[tuple[float, str]] = []
        self.finishes: list[tuple[float, str]] = []

    def slots(self):
        return self._slots

    def submit(self, trial, slot):
        now = time.time()
        self.submits.append((now, slot.name))
        self.running[trial.trial_id] = (now + self.duration, trial.candidate, slot.name)

    def wait(self, timeout):
        deadline = time.time() + timeout
        while True:
            now = time.time()
            done = [(tid, v) for tid, v in self.running.items() if v[0] <= now]
            if done or now >= deadline:
                break
            time.sleep(0.001)
        out = []
        for tid, (_, cand, slot) in done:
            del self.running[tid]
            self.finishes.append((now, slot))
            value = self.score(cand)
            if isinstance(value, Result):
                out.append((tid, value))
                continue
            out.append((tid, Result(status="ok", val_bpb=value) if value is not None
                        else Result(status="crash", error="boom")))
        return out

    def cancel(self, trial_id):
        if trial_id in self.running:
            self.cancelled.append(trial_id)
            self.running[trial_id] = (0.0, self.running[trial_id][1], self.running[trial_id][2])


class ListSearcher(Searcher):
    """Proposes candidates whose `knobs['x']` counts up; `ask_gate` can hold an ask open."""

    name = "list"

    def __init__(self, limit: int = 1000, ask_gate: threading.Event | None = None):
        self.limit = limit
        self.count = 0
        self.ask_gate = ask_gate
        self.told: list[tuple[str, float]] = []
        self.asks: list[int] = []

    def ask(self, n, ctx):
        self.asks.append(n)
        if self.ask_gate is not None:
            self.ask_gate.wait(10)
        out = []
        for _ in range(min(n, self.limit - self.count)):
            out.append(Candidate(source=f"X = {self.count}\n", knobs={"x": self.count}))
            self.count += 1
        return out

    def tell(self, trial, result):
        self.told.append((trial.trial_id, result.score()))

    def done(self):
        return self.count >= self.limit
