"""The end-of-study summary a person reads first: the best trials, the ones that did not score,
what the study learned (study/findings.py), and where to look next: the MLflow page that ranks its
trials, or, after a Ctrl-C, the command that resumes it.

The same rows print as a rich table in a terminal and as plain aligned text anywhere else (a log
file, a Slurm batch job), where a table sized for a terminal collapses. `leaderboard_text` is also
what the MLflow mirror attaches to the study's parent run.
"""
from __future__ import annotations

import os
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, TextIO

from study.changes import summary
from study.observers import StopKind
from study.progress import duration

COLUMNS = ("rank", "trial", "val_bpb", "steps", "train s", "device", "changes against the baseline")


def ranked_rows(state, baseline_knobs: Mapping[str, Any], top: int | None = None) -> list[tuple[str, ...]]:
    ranked = sorted((tr for tr in state.history if tr[1].ok and tr[0].candidate.full_budget),
                    key=lambda tr: tr[1].score())
    return [(str(i), trial.trial_id, f"{result.val_bpb:.4f}", str(result.num_steps or ""),
             f"{result.training_seconds or 0:.1f}", result.device_kind or "",
             summary(trial.candidate, baseline_knobs))
            for i, (trial, result) in enumerate(ranked[:top], start=1)]


def title(state, conf: dict, top: int) -> str:
    ok = sum(1 for t, r in state.history if r.ok and t.candidate.full_budget)
    screened = sum(1 for t, r in state.history if r.ok and not t.candidate.full_budget)
    not_ok = Counter(r.status for _, r in state.history if not r.ok)
    if screened:  # successive-halving rungs (searchers/rungs.py): a screening score is not a result
        not_ok["shorter-budget rung"] = screened
    unranked = f"; not ranked: {', '.join(f'{n} {s}' for s, n in sorted(not_ok.items()))}" if not_ok else ""
    return (f"study {conf['study']['name']}: top {min(top, ok)} of {ok} scored "
            f"({len(state.history)} finished{unranked})")


def failures(state) -> list[str]:
    return [f"{trial.trial_id} {result.status}: {result.why()[:160]}" for trial, result in state.history if not result.ok]


def leaderboard_text(state, conf: dict, baseline_knobs: Mapping[str, Any], top: int | None = None) -> str:
    """Every ranked trial (or the `top` ones) as aligned plain text, then the unscored ones."""
    rows = [COLUMNS, *ranked_rows(state, baseline_knobs, top)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [title(state, conf, top or len(state.history))]
    lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]
    lines += failures(state)
    return "\n".join(lines)


def print_leaderboard(state, conf: dict, study_dir: Path, mirrored: bool, simulated: bool, top: int = 10,
                      baseline_knobs: Mapping[str, Any] | None = None, stream: TextIO | None = None,
                      experiment_id: str | None = None, view: str | None = None,
                      findings: list[str] = ()) -> None:
    """The leaderboard, then the study time (idle between sessions apart), the best, what the study
    learned, and where to look next."""
    stream = stream or sys.stdout
    baseline_knobs = baseline_knobs or {}
    if stream.isatty():
        _print_table(state, conf, baseline_knobs, top, stream)
    else:
        stream.write(leaderboard_text(state, conf, baseline_knobs, top) + "\n")
    counts = Counter(r.status for _, r in state.history)
    clock = " (simulated clock)" if simulated else ""
    idle = state.clock.idle
    apart = f" (+{duration(idle)} idle between sessions)" if idle >= 1 else ""
    lines = [f"statuses: {dict(counts)}  study time{clock}: {duration(state.elapsed)}{apart}  "
             f"stopped: {state.stop_reason}"]
    if state.best:
        lines.append(f"best: {state.best[0].trial_id} val_bpb={state.best[1].val_bpb:.4f}  "
                     f"code: {study_dir / 'best_train.py'}  dir: {study_dir / 'best'}")
        lines.append(f"diff against the baseline: diff -u {study_dir / 'baseline_train.py'} "
                     f"{study_dir / 'best_train.py'}")
    lines += list(findings)
    if mirrored:
        lines.append(mlflow_hint(conf, experiment_id, view))
    if state.stop is StopKind.INTERRUPTED:
        lines.append(f"interrupted: {len(state.history)} trials are kept; the same command resumes the study: "
                     f"{resume_command()}")
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def mlflow_hint(conf: dict, experiment_id: str | None, view: str | None) -> str:
    """Where the study's trials are ranked in MLflow: the saved view, in the training sidebar."""
    from study.mlflow_content import view_link

    uri = conf["mlflow"]["tracking_uri"]
    served = uri.startswith(("http://", "https://"))
    base = uri if served else "http://127.0.0.1:5000"
    page = view_link(base, experiment_id, conf["study"]["name"]) if experiment_id and view else base
    serve = "" if served else f"{_here(Path(sys.executable).with_name('mlflow'))} ui --backend-store-uri {uri} --port 5000, then "
    return (f"MLflow: {serve}open {page}  (the trials of '{conf['study']['name']}' ranked by val_bpb; "
            f"experiment '{conf['study']['experiment']}')")


def resume_command() -> str:
    """The command this process was started with: the same command resumes the study."""
    return shlex.join([_here(Path(sys.executable)), *sys.argv])


def _here(program: Path) -> str:
    """A program of this environment as a person would type it from here (.venv/bin/python)."""
    return os.path.relpath(program) if program.is_relative_to(Path.cwd()) else str(program)


def _print_table(state, conf: dict, baseline_knobs, top: int, stream: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream)
    table = Table(title=title(state, conf, top), expand=True)
    for col in COLUMNS:
        last = col == COLUMNS[-1]
        table.add_column(col, justify="left" if last or col in ("trial", "device") else "right",
                         no_wrap=True, overflow="ellipsis", ratio=1 if last else None)
    for row in ranked_rows(state, baseline_knobs, top):
        table.add_row(*row)
    console.print(table)
    for line in failures(state):
        console.print(line, markup=False, highlight=False)
