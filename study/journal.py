"""The study journal: the source of truth.

One JSON object per line, appended and flushed to the OS per record, so a `kill -9` of the
orchestrator loses at most the line being written (which `read` skips); an fsync at most once a
second bounds what a power cut could take without putting a disk sync on every trial. MLflow, the leaderboard and a resumed
searcher are all rebuilt from it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from study.records import Result, Trial


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._synced = time.monotonic()

    def append(self, event: str, **data) -> None:
        record = {"event": event, "wall_time": time.time(), **data}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced > 1.0:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        p = Path(path)
        if not p.exists():
            return []
        records = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill mid-write
        return records


@dataclass
class JournalState:
    """What a journal says happened, in order: the study header, every trial submitted, every
    result, and the trials still in flight when it ends."""

    header: dict | None = None
    trials: dict[str, Trial] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JournalState":
        state = cls()
        for rec in Journal.read(path):
            kind = rec.get("event")
            if kind == "study" and state.header is None:
                state.header = rec
            elif kind == "submitted":
                trial = Trial.from_dict(rec["trial"])
                state.trials[trial.trial_id] = trial
            elif kind == "finished" and rec["trial_id"] not in state.results:
                state.results[rec["trial_id"]] = Result.from_dict(rec["result"])
                state.finish_order.append(rec["trial_id"])
        return state

    def in_flight(self) -> list[Trial]:
        return [t for tid, t in self.trials.items() if tid not in self.results]

    def finished(self) -> list[tuple[Trial, Result]]:
        return [(self.trials[tid], self.results[tid]) for tid in self.finish_order if tid in self.trials]
