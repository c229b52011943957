"""What a study says before its first trial: new, resuming, or already complete, and the settings
a reader of its log needs to interpret what follows.

A re-run of a finished command used to print nothing about the earlier run, and a multirun arm
could silently resume an older, longer study with the same name, giving an ablation unequal arms.
Here a resume is always announced, and an arm that already holds more finished trials than
`study.max_trials` asks for is refused, with the fix, before anything starts.
"""
from __future__ import annotations

from typing import TextIO

from study.journal import JournalState


class UnequalArms(ValueError):
    """The study on disk has already run past `study.max_trials`: resuming it would report more
    trials than this command asked for."""


def check_trial_budget(existing: JournalState, max_trials: int | None, study_dir) -> None:
    done = len(existing.results)
    if max_trials is not None and done > max_trials:
        raise UnequalArms(
            f"{study_dir} already holds {done} finished trials, more than study.max_trials={max_trials}: "
            f"its results would not compare with {max_trials}-trial arms. Use study.max_trials={done}, "
            "another study.name, or move that folder away")


def startup_warning(random_start: int, max_trials: int | None, sampler: str | None) -> str | None:
    """A study too short for its sampler to model anything is random search under another name: an
    ablation of TPE against random at 5 trials compares random with random. One line, with the fix."""
    if max_trials is None or max_trials > random_start:
        return None
    return (f"warning: study.max_trials={max_trials} leaves {sampler} no modelled trial: all of them are drawn at "
            f"random (its start-up is {random_start}), so this study is random search; use study.max_trials > "
            f"{random_start}, or searcher.options.n_startup_trials < {max_trials}")


def banner(conf: dict, objective: dict, existing: JournalState, slots: int, stream: TextIO,
           random_start: int | None = None) -> None:
    """Two or three lines: what this study is, and whether it starts, resumes or has nothing to do.
    `random_start` is the searcher's own count of first trials drawn at random (Searcher.random_start)."""
    name, max_trials = conf["study"]["name"], conf["study"].get("max_trials")
    searcher = conf["searcher"]
    budget = f"{objective['budget']:g} {objective['budget_kind']}"
    limits = [f"max {max_trials} trials" if max_trials else "", f"max {conf['study']['max_hours']:g} h"
              if conf["study"].get("max_hours") else ""]
    lines = [f"study {name}: searcher {searcher.get('name')}, launcher {conf['launcher'].get('name')} "
             f"({slots} slots), objective {objective.get('preset')} ({budget} per trial, hard limit "
             f"{objective['hard_limit_s']:g} s), seed {conf['seed']}; {', '.join(x for x in limits if x) or 'no limit'}"]
    if random_start:
        lines.append(f"sampler start-up: the first {random_start} trials are drawn at random before "
                     f"{searcher.get('sampler')} models anything (searcher.options.n_startup_trials)")
        warning = startup_warning(random_start, max_trials, searcher.get("sampler"))
        if warning:
            lines.append(warning)
    done, in_flight = len(existing.results), len(existing.in_flight()) + len(existing.to_rerun())
    of = f" of {max_trials}" if max_trials else ""
    if existing.header is None:
        lines.append(f"starting {name}")
    elif max_trials is not None and done >= max_trials:
        lines.append(f"already complete: {name} has {done}{of} trials done; nothing to run "
                     "(raise study.max_trials to continue it)")
    else:
        flight = f", {in_flight} unfinished at the last stop (adopted or re-run)" if in_flight else ""
        lines.append(f"resuming {name}: {done}{of} done{flight}")
    stream.write("\n".join(lines) + "\n")
    stream.flush()
