"""The study journal: the source of truth.

One JSON object per line, appended and flushed to the OS per record, so a `kill -9` of the
orchestrator loses at most the line being written; an fsync at most once a second bounds what a
power cut could take without putting a disk sync on every trial. MLflow, the leaderboard and a
resumed searcher are all rebuilt from it.

Every line carries a CRC-32 of its own text (`"crc"`, the last key), so damage is told from
absence: a torn final line (a kill mid-write) is the only damage repaired silently; any other line
that fails its check stops the resume with one line naming it, because guessing would drop a trial
from the study or hand its id to a new candidate. A checksum cannot see a line that is gone, so
every line also carries its sequence number (`"seq"`, its 0-based line number) and the CRC-32 of
the whole line before it (`"prev"`): a line deleted, duplicated or moved anywhere but at the very
end breaks the numbering or the chain and is refused the same way. (A line lost from the end is
what a kill before it was written leaves; what it recorded is checked against the trial folders,
`study/recovery.py`.) Lines without a checksum are accepted only at the start of the file (a
journal written before checksums existed), and lines without a number only before the first
numbered one (a journal written before numbering).
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
    RECOVERED = "recovered"  # a proven result whose lines the journal had lost (then submitted, finished)
    ASKED = "asked"  # the searcher proposed n candidates in so many seconds
    FINISHED = "finished"  # a trial's stamped result: the source of truth for everything after
    SEARCHER_ERROR = "searcher_error"
    STOPPED = "stopped"  # why the loop ended (kind and reason)


_CHECKED = re.compile(rb'^(\{.*), "crc": "([0-9a-f]{8})"\}$')


class JournalDamaged(ValueError):
    """A journal line other than a torn last one fails its checksum or does not parse, or lines are
    missing, repeated or out of order."""

    def __init__(self, path: Path, line: int, why: str):
        super().__init__(
            f"{path} line {line} is damaged ({why}); nothing was started. Restore the journal from a "
            "backup (editing it by hand is refused: its lines are numbered and chained), or start "
            "afresh under another study.name")
        self.line = line


def encode(record: dict, seq: int | None = None, prev: str | None = None) -> bytes:
    """One journal line: the record's JSON, its sequence number and the previous line's CRC (when
    given), with the CRC-32 of that exact text appended as `crc`."""
    numbered = {**record, "seq": seq, "prev": prev} if seq is not None else record
    body = json.dumps(numbered, default=str).encode()
    return body[:-1] + b', "crc": "%08x"}\n' % zlib.crc32(body)


def line_crc(line: bytes) -> str:
    """What the next line's `prev` holds: the CRC-32 of this whole line (without its newline)."""
    return "%08x" % zlib.crc32(line)


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
        lines = self.path.read_bytes().split(b"\n")[:-1] if self.path.exists() else []
        self._seq = len(lines)  # the next line's number
        self._prev = line_crc(lines[-1]) if lines else None
        self._file = open(self.path, "ab")
        self._synced = time.monotonic()

    def append(self, event: Event, **data) -> None:
        line = encode({"event": event, "wall_time": time.time(), **data}, self._seq, self._prev)
        self._file.write(line)
        self._file.flush()
        self._seq, self._prev = self._seq + 1, line_crc(line[:-1])
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
        if tail and decode(tail, legacy_ok=False) is not None:
            lines.append(tail)  # only the newline was lost
        records, legacy_ok, numbered = [], True, False
        for number, line in enumerate(lines, 1):
            record = decode(line, legacy_ok=legacy_ok)
            if record is None:
                why = "empty line" if not line.strip() else "checksum or JSON does not match"
                raise JournalDamaged(p, number, why)
            legacy_ok = legacy_ok and not _CHECKED.match(line)
            seq, prev = record.pop("seq", None), record.pop("prev", None)
            if seq is None and numbered:
                raise JournalDamaged(p, number, "a line without a sequence number among numbered ones")
            if seq is not None:
                numbered = True
                _check_order(p, number, seq, prev, lines[number - 2] if number > 1 else None)
            records.append(record)
        return records


def _check_order(path: Path, number: int, seq, prev, previous: bytes | None) -> None:
    """Line `number` must be record #number-1 and follow the line before it exactly."""
    if seq != number - 1:
        if not isinstance(seq, int):
            raise JournalDamaged(path, number, f"sequence number {seq!r} is not a number")
        if seq > number - 1:
            missing = seq - (number - 1)
            raise JournalDamaged(path, number, f"it is record #{seq} where #{number - 1} belongs: "
                                               f"{missing} line{'s' if missing > 1 else ''} before it "
                                               f"{'are' if missing > 1 else 'is'} missing")
        raise JournalDamaged(path, number, f"it is record #{seq} again where #{number - 1} belongs: "
                                           "a line repeated or moved")
    if prev != (line_crc(previous) if previous is not None else None):
        raise JournalDamaged(path, number, "it does not follow the line before it: lines were replaced, "
                                           "reordered or renumbered")


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
    directories: set[str] = field(default_factory=set)  # every attempt's folder the journal names
    first_event: str | None = None  # a journal whose first line is not the header lost it

    @classmethod
    def load(cls, path: str | os.PathLike) -> "JournalState":
        state = cls()
        for rec in Journal.read(path):
            kind = rec.get("event")
            state.first_event = state.first_event or kind
            if kind == Event.STUDY and state.header is None:
                state.header = rec
            elif kind == Event.SUBMITTED:
                trial = Trial.from_dict(rec["trial"])
                state.trials[trial.trial_id] = trial
                state.directories.add(trial.directory)
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
