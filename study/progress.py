"""Progress a person can read: a live table in a terminal, one line per event in a log.

In a terminal, rich redraws one frame: each slot's trial with its step, share of the budget, time
left and last loss (read from the trial's steps.log, which only the harness writes, as it trains), the
trials that just finished, and an ETA for the study. When the output is a file (nohup, a Slurm
batch job of the orchestrator, `| tee`), a redrawn frame is useless: nothing shows until the end
and the last frame lands on top of the summary. There, every event is one plain, timestamped line
that `tail -f` and `grep` understand, and a heartbeat line says how the running trials are doing.

Both are study observers (study/observers.py): started when the study starts, redrawn on every
tick from the loop's `StudyState` (never changing it), stopped when it ends.
"""
from __future__ import annotations

import heapq
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from study.changes import summary
from study.observers import StudyObserver
from train.contract import STEPS_FILE

RECENT = 5  # finished trials the live table keeps in view
HEARTBEAT_S = 60.0  # how often a log gets a line about the running trials when nothing else happens


def make_display(study_name: str, simulated: bool, baseline_knobs: Mapping[str, Any],
                 stream: TextIO | None = None):
    """A live table when `stream` (default stdout) is a terminal, else one line per event."""
    stream = stream or sys.stdout
    if stream.isatty():
        return LiveDisplay(study_name, simulated, baseline_knobs)
    return LineDisplay(study_name, simulated, baseline_knobs, stream)


# -- what both displays compute ------------------------------------------------------------------

def trial_progress(trial_dir: str | os.PathLike | None) -> dict[str, float]:
    """The harness's last `step=… loss=… progress=… training_seconds=…` line of a running trial,
    as numbers; {} before the first one. Reads only the end of steps.log, so it is cheap enough for
    every redraw."""
    if not trial_dir:
        return {}
    try:
        with open(Path(trial_dir) / STEPS_FILE, "rb") as f:  # not run.log: the candidate prints there
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        values = parse_step_line(line)
        if values:
            return values
    return {}


def parse_step_line(line: str) -> dict[str, float]:
    """`step=288 loss=4.1 progress=0.48 training_seconds=12.3` as numbers, {} for any other line."""
    if not line.startswith("step="):
        return {}
    values = {}
    for word in line.split():
        key, _, value = word.partition("=")
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values if "progress" in values else {}


def seconds_left(progress: Mapping[str, float]) -> float | None:
    """Training time left at the trial's own pace so far (excludes the final evaluation)."""
    p, spent = progress.get("progress"), progress.get("training_seconds")
    if not p or spent is None:
        return None
    return spent * (1 - p) / p


def study_eta(state, rules) -> float | None:
    """Seconds until the study ends: each trial still to start goes to the slot that frees first,
    at the median slot time of the trials finished so far. None before anything finished (no pace
    to go by) or when only a time limit ends the study."""
    by_time = None if rules.max_hours is None else max(0.0, rules.max_hours * 3600 - state.elapsed)
    durations = [r.finished_at - r.started_at for _, r in state.history
                 if r.finished_at is not None and r.started_at is not None]
    if rules.max_trials is None or not durations:
        return by_time
    pace = statistics.median(durations)
    free_at = [max(0.0, pace - running_for(state, r)) for r in state.running.values()]
    free_at += [0.0] * max(0, max(1, len(state.slots)) - len(free_at))
    heapq.heapify(free_at)
    for _ in range(max(0, rules.max_trials - len(state.history) - len(state.running))):
        heapq.heappush(free_at, heapq.heappop(free_at) + pace)
    eta = max(free_at, default=0.0)
    return eta if by_time is None else min(eta, by_time)


def running_for(state, running) -> float:
    """Seconds since the trial was submitted; never negative (the loop's clock is read once per
    iteration, so a trial submitted later in that iteration is ahead of it)."""
    submitted = running.trial.submitted_at
    if submitted is None:
        return 0.0
    return max(0.0, state.elapsed - state.clock.since_start(submitted))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def headline(study_name: str, simulated: bool, state, rules) -> str:
    """`NAME  elapsed 3.2 min (+1.1 h idle)  done 5 of 12 (1 failed)  best 1.7418 (t0000)  ETA 4.1 min`:
    elapsed is study time (study/clock.py), the idle time between sessions shown apart."""
    done = len(state.history)
    failed = sum(1 for _, r in state.history if not r.ok)
    of = f" of {rules.max_trials}" if rules.max_trials else ""
    idle = state.clock.idle
    parts = [study_name + (" (simulated clock)" if simulated else ""),
             f"elapsed {duration(state.elapsed)}" + (f" (+{duration(idle)} idle)" if idle >= 1 else ""),
             f"done {done}{of}" + (f" ({failed} failed)" if failed else ""),
             f"best {state.best[1].val_bpb:.4f} ({state.best[0].trial_id})" if state.best else "best -"]
    eta = study_eta(state, rules)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    if rules.max_hours:
        parts.append(f"limit {rules.max_hours:g} h")
    return "  ".join(parts)


def result_text(result) -> str:
    if result.ok:
        return f"val_bpb {result.val_bpb:.4f}"
    reason = result.why()
    return result.status + (f" ({reason[:80]})" if reason else "")


class _Display(StudyObserver):
    """What both displays do on the loop's hooks: each only redraws from the state it is given."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def update(self, state, rules) -> None: ...

    def on_start(self, state, resumed) -> None:
        self.start()

    def on_tick(self, state, rules) -> None:
        self.update(state, rules)

    def on_end(self, state, end) -> None:
        self.stop()


# -- a terminal ----------------------------------------------------------------------------------

class LiveDisplay(_Display):
    """One rich frame, redrawn at most every `refresh_s`, using the terminal's full width."""

    def __init__(self, study_name: str, simulated: bool, baseline_knobs: Mapping[str, Any],
                 refresh_s: float = 0.5):
        from rich.live import Live
        from rich.text import Text

        self.study_name = study_name
        self.simulated = simulated
        self.baseline_knobs = dict(baseline_knobs)
        self.refresh_s = refresh_s
        self._live = Live(Text(""), refresh_per_second=4, transient=False)
        self._last = 0.0
        self._seen = None  # the last (state, rules), for a final frame that shows how it ended

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        if self._seen:
            self._live.update(self.render(*self._seen))
        self._live.stop()

    def update(self, state, rules) -> None:
        self._seen = (state, rules)
        if time.time() - self._last < self.refresh_s:
            return
        self._last = time.time()
        self._live.update(self.render(state, rules))

    def render(self, state, rules):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        slots = Table(box=None, expand=True, header_style="bold")
        for col in ("slot", "trial", "running", "step", "budget", "left", "loss"):
            slots.add_column(col, no_wrap=True, justify="left" if col in ("slot", "trial") else "right")
        slots.add_column("changes against the baseline", ratio=1, no_wrap=True, overflow="ellipsis")
        by_slot = {r.slot.name: r for r in state.running.values()}
        for slot in state.slots:
            r = by_slot.get(slot.name)
            if r is None:
                slots.add_row(f"{slot.name} ({slot.device_kind})", "[dim]free[/dim]", *[""] * 6)
                continue
            p = trial_progress(r.trial.directory)
            slots.add_row(
                f"{slot.name} ({slot.device_kind})", r.trial.trial_id, duration(running_for(state, r)),
                f"{p['step']:.0f}" if "step" in p else "-", f"{p['progress']:.0%}" if "progress" in p else "-",
                duration(seconds_left(p)), f"{p['loss']:.3f}" if "loss" in p else "-",
                Text(summary(r.trial.candidate, self.baseline_knobs)))
        recent = Table(box=None, expand=True, header_style="bold", title="just finished", title_justify="left")
        for col in ("trial", "result"):
            recent.add_column(col, no_wrap=True)
        recent.add_column("changes against the baseline", ratio=1, no_wrap=True, overflow="ellipsis")
        for trial, result in reversed(state.history[-RECENT:]):
            # A candidate writes its errors and an agent its hypotheses: plain text, never markup
            # (a "[/dim]" in them stopped the display; "[bold]ok val_bpb 0.01" was drawn as such).
            mark = Text(" best", style="green") if state.best and state.best[0] is trial else Text("")
            recent.add_row(trial.trial_id, Text(result_text(result)) + mark,
                           Text(summary(trial.candidate, self.baseline_knobs)))
        head = headline(self.study_name, self.simulated, state, rules)
        if state.thinking:
            head += "  [cyan]searcher thinking...[/cyan]"
        parts = [Text.from_markup(f"[bold]{head}[/bold]"), slots]
        if state.history:
            parts.append(recent)
        return Group(*parts)


# -- a log file ----------------------------------------------------------------------------------

class LineDisplay(_Display):
    """One line per event (a trial started, a trial finished, a new best), a heartbeat about the
    running trials at most every HEARTBEAT_S, and nothing redrawn. Events are found by comparing
    the state with the last one seen, so this works from the same `update` calls as the table."""

    def __init__(self, study_name: str, simulated: bool, baseline_knobs: Mapping[str, Any], stream: TextIO,
                 heartbeat_s: float = HEARTBEAT_S):
        self.study_name = study_name
        self.simulated = simulated
        self.baseline_knobs = dict(baseline_knobs)
        self.stream = stream
        self.heartbeat_s = heartbeat_s
        self._running: set[str] = set()
        self._done: int | None = None  # history entries already reported (None: not yet seen)
        self._beat = time.monotonic()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stream.flush()

    def update(self, state, rules) -> None:
        if self._done is None:  # what a resumed study replayed is not news
            self._done = len(state.history)
        for trial, result in state.history[self._done:]:
            self._running.discard(trial.trial_id)
            best = " NEW BEST" if state.best and state.best[0] is trial else ""
            self._print(state, f"{trial.trial_id} {result_text(result)}{best}  "
                               f"[{headline(self.study_name, self.simulated, state, rules)}]")
        self._done = len(state.history)
        for trial_id, r in state.running.items():
            if trial_id not in self._running:
                self._running.add(trial_id)
                self._print(state, f"{trial_id} started on {r.slot.name}: "
                                   f"{summary(r.trial.candidate, self.baseline_knobs)}")
        if state.running and time.monotonic() - self._beat >= self.heartbeat_s:
            self._print(state, "running: " + "; ".join(
                f"{tid} {self._progress_text(r)}" for tid, r in state.running.items()))

    def _progress_text(self, running) -> str:
        p = trial_progress(running.trial.directory)
        if not p:
            return "starting"
        loss = f" loss {p['loss']:.3f}" if "loss" in p else ""
        return f"step {p.get('step', 0):.0f} ({p['progress']:.0%}, {duration(seconds_left(p))} left){loss}"

    def _print(self, state, text: str) -> None:
        self._beat = time.monotonic()
        stamp = time.strftime("%H:%M:%S")
        self.stream.write(f"{stamp} [{duration(state.elapsed):>7}] {text}\n")
        self.stream.flush()
