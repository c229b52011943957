"""The study journal: the source of truth.

One JSON object per line, appended and flushed to the OS per record, so a `kill -9` of the
orchestrator loses at most the line being written; an fsync at most once a second bounds what a
power cut could take without putting a disk sync on every trial. MLflow, the leaderboard and a
resumed searcher are all rebuilt from it.

Every line carries a CRC-32 of its own text (`"crc"`, the last key), so damage is told from
absence: a torn final line (a kill mid-write) is the only damage repaired silently; any other line
that fails its check stops the resume with one line naming it, because guessing would drop a trial
from the study or hand its id to a new candidate. Lines without a checksum are accepted only at the
start of the file (a journal written before checksums existed).
"""
from __future__ import annotations

import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from study.records import INFRA_STATUSES, Result, Trial


class Event(StrEnum):
    """What a journal line records (its `event` field), like optuna's JournalOperation. A StrEnum
    so the file keeps readable words and journals written before it load unchanged."""

    STUDY = "study"  # the header: what identifies the study, and its clock origin
    RESUMED = "resumed"
    SUBMITTED = "submitted"  # a trial (or a new attempt of one) and where it went
    RESUBMITTED = "resubmitted"  # an unmeasured trial run again (followed by submitted)
    ADOPTED = "adopted"  # an in-flight trial still running after a restart, collected again
    ASKED = "asked"  # the searcher proposed n candidates in so many seconds
    FINISHED = "finished"  # a trial's stamped result: the source of truth for everything after
    SEARCHER_ERROR = "searcher_error"
    STOPPED = "stopped"  # why the loop ended (kind and reason)


_CHECKED = re.compile(rb'^(\{.*), "crc": "([0-9a-f]{8})"\}$')


class JournalDamaged(ValueError):
    """A journal line other than a torn last one fails its checksum or does not parse."""

    def __init__(self, path: Path, line: int, why: str):
        super().__init__(
            f"{path} line {line} is damaged ({why}); nothing was started. Restore the journal from a "
            f"backup, or delete line {line} by hand to accept losing that record (trial ids are never "
            "reused: the trials/ folder still counts them)")
        self.line = line


def encode(record: dict) -> bytes:
    """One journal line: the record's JSON with the CRC-32 of that exact text appended as `crc`."""
    body = json.dumps(record, default=str).encode()
    return body[:-1] + b', "crc": "%08x"}\n' % zlib.crc32(body)


def decode(line: bytes, *, legacy_ok: bool) -> dict | None:
    """The record on a line, or None when the line is damaged."""
    match = _CHECKED.match(line)
    if match:
        body = match.group(1) + b"}"
        if int(match.group(2), 16) != zlib.crc32(body):
            return None
        line = body
    elif not legacy_ok:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_torn_tail(self.path)
        self._file = open(self.path, "ab")
        self._synced = time.monotonic()

    def append(self, event: Event, **data) -> None:
        self._file.write(encode({"event": event, "wall_time": time.time(), **data}))
        self._file.flush()
        if time.monotonic() - self._synced > 1.0:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()  # closed even when the disk refused the last flush

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        """Every record, in order; a torn final line is left out, any other damage raises
        JournalDamaged."""
        p = Path(path)
        if not p.exists():
            return []
        lines = p.read_bytes().split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else a line cut short
        records, legacy_ok = [], True
        for number, line in enumerate(lines, 1):
            record = decode(line, legacy_ok=legacy_ok)
            if record is None:
                why = "empty line" if not line.strip() else "checksum or JSON does not match"
                raise JournalDamaged(p, number, why)
            legacy_ok = legacy_ok and not _CHECKED.match(line)
            records.append(record)
        complete = decode(tail, legacy_ok=False) if tail else None
        if complete is not None:  # only the newline was lost
            records.append(complete)
        return records


def _repair_torn_tail(path: Path) -> None:
    """A kill mid-write leaves a last line without its newline: drop it (or, if it is whole and
    only the newline is missing, finish it) before appending after it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        if decode(data[cut:], legacy_ok=False) is not None:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(cut)


@dataclass
class JournalState:
    """What a journal says happened, in order: the study header, every trial submitted, every
    result, and the trials still in flight when it ends.

    A trial id may be submitted more than once (a re-run after a restart); its latest attempt is the
    one that counts. A trial whose latest result is an infrastructure outcome (`cancelled`, `lost`)
    was never measured: it is in `to_rerun`, not in `results`."""

    header: dict | None = None
    trials: dict[str, Trial] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    finish_order: list[str] = field(default_factory=list)
    unmeasured: dict[str, Result] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JournalState":
        state = cls()
        for rec in Journal.read(path):
            kind = rec.get("event")
            if kind == Event.STUDY and state.header is None:
                state.header = rec
            elif kind == Event.SUBMITTED:
                trial = Trial.from_dict(rec["trial"])
                state.trials[trial.trial_id] = trial
                state.unmeasured.pop(trial.trial_id, None)  # a new attempt
            elif kind == Event.FINISHED:
                tid = rec["trial_id"]
                if tid in state.results or tid in state.unmeasured:
                    continue  # a late duplicate of an attempt that already ended
                result = Result.from_dict(rec["result"])
                if result.status in INFRA_STATUSES and not rec.get("final"):
                    state.unmeasured[tid] = result
                else:
                    state.results[tid] = result
                    state.finish_order.append(tid)
        return state

    def in_flight(self) -> list[Trial]:
        return [t for tid, t in self.trials.items() if tid not in self.results and tid not in self.unmeasured]

    def to_rerun(self) -> list[Trial]:
        """Trials that ended without a measurement (cancelled, lost): a resumed study runs them again."""
        return [self.trials[tid] for tid in self.unmeasured if tid in self.trials]

    def finished(self) -> list[tuple[Trial, Result]]:
        return [(self.trials[tid], self.results[tid]) for tid in self.finish_order if tid in self.trials]
