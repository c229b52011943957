"""Study time: the one clock every report of a study reads.

A study may run in several sessions (stopped, resumed a day later). The hours between them are
not study time: no orchestrator ran and no trial of the study was running. Study time is the
*active* time: seconds since the study started on the launcher's clock, less those idle gaps. The
live header, the end-of-study summary, `study.max_hours`, the trial metrics `t_submitted_s`,
`t_started_s`, `t_finished_s` (and so every time axis of analysis/), the parent run's
`wall_seconds` and its duration in MLflow all read this clock; the idle time is shown apart
(`idle_seconds`, "+2.1 h idle between sessions").

A gap runs from the last journal record of a session to the next session's `resumed` record,
less any time a trial of the study was still running in it (a trial adopted on resume ran through
the gap: that was compute, not idleness). After a stop the last record is the `stopped` one; after
a kill -9 it is the last event before the kill, so a silent stretch before it counts as idle unless
a trial is known to have run through it. A simulated clock has no gaps: a resumed virtual clock
carries on from its last event. Everything here is derived from the journal, so a resumed study
rebuilds the same clock.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from study.journal import Event
from study.records import Result


@dataclass
class StudyClock:
    origin: float = 0.0  # the launcher's clock when the study first started
    gaps: list[tuple[float, float]] = field(default_factory=list)  # idle spans, on the launcher's clock

    def active(self, t: float) -> float:
        """Study seconds at instant `t` of the launcher's clock."""
        return t - self.origin - sum(max(0.0, min(t, end) - start) for start, end in self.gaps)

    def since_start(self, offset: float) -> float:
        """Study seconds of an offset from the study's start (the journal's `submitted_at`)."""
        return self.active(self.origin + offset)

    @property
    def idle(self) -> float:
        return sum(end - start for start, end in self.gaps)

    def ran(self, start: float | None, end: float | None) -> None:
        """A trial of the study ran over [start, end]: none of that is idle."""
        if start is None or end is None or end <= start:
            return
        kept = []
        for gap_start, gap_end in self.gaps:
            if end <= gap_start or start >= gap_end:
                kept.append((gap_start, gap_end))
                continue
            if gap_start < start:
                kept.append((gap_start, start))
            if end < gap_end:
                kept.append((end, gap_end))
        self.gaps = kept

    @classmethod
    def from_journal(cls, records: list[dict], simulated: bool) -> "StudyClock":
        """The clock of the study whose journal records these are (`Journal.read`)."""
        header = next((r for r in records if r.get("event") == Event.STUDY), None)
        clock = cls(origin=float(header["clock_origin"]) if header else 0.0)
        if simulated:
            return clock
        previous = None
        for record in records:
            if record.get("event") == Event.RESUMED and previous is not None and record["wall_time"] > previous:
                clock.gaps.append((previous, record["wall_time"]))
            previous = record.get("wall_time", previous)
        for record in records:
            if record.get("event") == Event.FINISHED:
                result = Result.from_dict(record["result"])
                clock.ran(result.started_at, result.finished_at)
        return clock
