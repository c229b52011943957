"""The agent's scoreboard: which candidate is the kept best, and why.

The keep rule is here, apart from any API code, because it is what makes an agent's "improvement"
trustworthy: a candidate replaces the best only if it beats it by more than `noise_margin`, or if
it wins `confirm_seeds` re-runs of the same source under other seeds (the mean of its runs against
the mean of the best's). A seed change is never an improvement: the agent cannot set the seed,
and an unchanged source is refused before it takes a slot. Under a seconds budget a faster device
trains more tokens, so a win on another device kind than the best's is only kept after re-runs on
the best's kind.

Everything is rebuilt from `record` (the searcher's `tell`), so a resumed study replays to the same
decisions.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import math
import statistics
from dataclasses import dataclass, field

from study.records import INFRA_STATUSES, Result, Trial

BASELINE, AGENT, CONFIRM = "baseline", "agent", "confirm"


@dataclass
class Run:
    """One finished trial as the board sees it."""

    trial_id: str
    index: int
    source: str
    parent: str | None
    hypothesis: str
    role: str
    seed: int
    device_kind: str | None
    status: str
    score: float
    directory: str
    knobs: dict = field(default_factory=dict)
    code: str = ""
    confirms: str | None = None
    decision: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.score)


@dataclass
class ConfirmJob:
    """A re-run of a challenger under another seed, to be issued as a candidate."""

    challenger: str
    source: str
    seed: int
    device_kind: str | None


@dataclass
class _Challenge:
    seeds: list[int]
    device_kind: str | None
    runs: list[Run] = field(default_factory=list)


class Board:
    def __init__(self, baseline_source: str, *, noise_margin: float, confirm_seeds: int,
                 kind_sensitive: bool, wait_for_baseline: bool):
        self.baseline_source = baseline_source
        self.noise_margin = float(noise_margin)
        self.confirm_seeds = int(confirm_seeds)
        self.kind_sensitive = kind_sensitive
        self.wait_for_baseline = wait_for_baseline
        self.runs: dict[str, Run] = {}
        self.best_id: str | None = None
        self.best_runs: list[Run] = []
        self.challenges: dict[str, _Challenge] = {}
        self.waiting: list[Run] = []  # judged once the baseline's result is known
        self.baseline_seen = False
        self.kept: list[str] = []

    # -- what the searcher tells ------------------------------------------------------------------
    def record(self, trial: Trial, result: Result) -> Run:
        c = trial.candidate
        role = c.meta.get("role") or (BASELINE if c.source == self.baseline_source else AGENT)
        run = Run(
            trial_id=trial.trial_id, index=trial.index, source=c.source, parent=c.parent,
            hypothesis=c.hypothesis, role=role, seed=trial.seed if c.seed is None else c.seed,
            device_kind=result.device_kind or trial.device_kind or c.device_kind, status=result.status,
            score=result.score(), directory=trial.directory, knobs=dict(c.knobs), code=code_key(c.source), confirms=c.meta.get("confirms"),
            error=(result.reason or result.error or "")[-300:],
        )
        self.runs[run.trial_id] = run
        if result.status in INFRA_STATUSES:
            run.decision = f"{result.status}: not judged (the infrastructure failed, not the candidate)"
        elif role == BASELINE:
            self._on_baseline(run)
        elif role == CONFIRM:
            self._on_confirmation(run)
        else:
            self._judge(run)
        return run

    def _on_baseline(self, run: Run) -> None:
        self.baseline_seen = True
        run.decision = "baseline" if run.ok else f"baseline {run.status}"
        if run.ok and self.best_id is None:
            self._keep(run, [run], "baseline")
        waiting, self.waiting = self.waiting, []
        for r in waiting:
            self._judge(r)

    def _judge(self, run: Run) -> None:
        if not run.ok:
            run.decision = run.status
            return
        if self.wait_for_baseline and not self.baseline_seen:
            run.decision = "waiting for the baseline"
            self.waiting.append(run)
            return
        if self.best_id is None:
            self._keep(run, [run], "kept: first ok result")
            return
        best = self.best_score()
        gain = best - run.score
        same_kind = not self.kind_sensitive or run.device_kind == self.best_kind()
        if gain > self.noise_margin and same_kind:
            self._keep(run, [run], f"kept: {gain:+.4f} > margin {self.noise_margin}")
        elif gain > 0 and self.confirm_seeds > 0:
            kind = self.best_kind() if self.kind_sensitive else None
            seeds = [run.seed + i for i in range(1, self.confirm_seeds + 1)]
            self.challenges[run.trial_id] = _Challenge(seeds, kind, [run] if same_kind else [])
            why = "within noise" if same_kind else f"on {run.device_kind}, best on {kind}"
            run.decision = f"confirming: {gain:+.4f} {why}, {len(seeds)} re-runs"
        elif gain > 0:
            run.decision = f"discarded: {gain:+.4f} within noise {self.noise_margin}" if same_kind else \
                f"discarded: {gain:+.4f} on {run.device_kind}, best on {self.best_kind()}"
        else:
            run.decision = f"discarded: {gain:+.4f}"

    def _on_confirmation(self, run: Run) -> None:
        run.decision = f"re-run of {run.confirms}"
        ch = self.challenges.get(run.confirms)
        if ch is None:
            return
        ch.runs.append(run)
        done = [r for r in ch.runs if r.role == CONFIRM]
        if len(done) < len(ch.seeds):
            return
        del self.challenges[run.confirms]
        challenger = self.runs[run.confirms]
        failed = [r for r in ch.runs if not r.ok]
        if failed:
            challenger.decision = f"rejected: re-run {failed[0].trial_id} {failed[0].status}"
            return
        mean = statistics.fmean(r.score for r in ch.runs)
        best = self.best_score()
        summary = f"mean {mean:.4f} over {len(ch.runs)} runs vs {best:.4f}"
        if mean < best:
            self._keep(challenger, ch.runs, f"kept after re-runs: {summary}")
        else:
            challenger.decision = f"rejected after re-runs: {summary}"

    def _keep(self, run: Run, runs: list[Run], why: str) -> None:
        self.best_id = run.trial_id
        self.best_runs = list(runs)
        self.kept.append(run.trial_id)
        run.decision = why

    # -- what the searcher asks ------------------------------------------------------------------
    def best(self) -> Run | None:
        return self.runs.get(self.best_id) if self.best_id else None

    def best_score(self) -> float:
        return statistics.fmean(r.score for r in self.best_runs) if self.best_runs else math.inf

    def best_kind(self) -> str | None:
        return self.best_runs[0].device_kind if self.best_runs else None

    def best_source(self) -> str:
        b = self.best()
        return b.source if b else self.baseline_source

    def confirmations_due(self, issued: set[tuple[str, int]]) -> list[ConfirmJob]:
        """Re-runs not yet told, in flight or issued; `issued` holds (challenger, seed) pairs."""
        jobs = []
        for cid, ch in self.challenges.items():
            have = {(r.confirms, r.seed) for r in ch.runs if r.role == CONFIRM}
            for seed in ch.seeds:
                if (cid, seed) not in have and (cid, seed) not in issued:
                    jobs.append(ConfirmJob(cid, self.runs[cid].source, seed, ch.device_kind))
        return jobs

    def owner_of(self, source: str) -> str | None:
        """The trial that already ran this code, comments and layout aside (not counting re-runs)."""
        key = code_key(source)
        for r in self.runs.values():
            if r.code == key and r.role != CONFIRM and r.status not in INFRA_STATUSES:
                return r.trial_id
        return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs.values():
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def table(self, *, top: int = 10, last: int = 20, ids: list[str] | None = None) -> str:
        """A TSV of the best `top` runs by val_bpb, then the `last` finished, without repeats."""
        runs = sorted(self.runs.values(), key=lambda r: r.index)
        if ids:
            chosen = [self.runs[i] for i in ids if i in self.runs]
        else:
            best = sorted((r for r in runs if r.ok), key=lambda r: r.score)[:max(0, top)]
            recent = runs[-last:] if last > 0 else []
            chosen = best + [r for r in recent if r not in best]
        ref = self.best_score()
        lines = ["trial\tstatus\tval_bpb\tvs_best\tdevice\tseed\tparent\tdecision\thypothesis"]
        for r in chosen:
            score = f"{r.score:.4f}" if r.ok else "-"
            delta = f"{r.score - ref:+.4f}" if r.ok and math.isfinite(ref) else "-"
            lines.append("\t".join([r.trial_id, r.status, score, delta, r.device_kind or "-", str(r.seed),
                                    r.parent or "baseline", r.decision, _one_line(r.hypothesis, 120)]))
        return "\n".join(lines)


def code_key(source: str) -> str:
    """Equal for two sources that differ only in comments, blank lines or layout, which would run
    the same training: resubmitting one is a seed re-roll, not an idea."""
    try:
        text = ast.dump(ast.parse(source))
    except (SyntaxError, ValueError):
        text = source
    return hashlib.sha256(text.encode()).hexdigest()


def unified_diff(old: str, new: str, old_name: str, new_name: str, max_lines: int = 400) -> str:
    lines = list(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                      fromfile=old_name, tofile=new_name, n=2))
    if not lines:
        return "(identical)"
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more diff lines)\n"]
    return "".join(lines)


def _one_line(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
