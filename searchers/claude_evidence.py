"""The agent's analysis tool: the whole history, aggregated by the searcher, so the model reads
evidence instead of re-deriving it from 30 rows of a results table.

Every number is a difference from the baseline's mean on the run's own device kind (`Board.relative`:
what the code, not the hardware, bought), with its noise: the standard error of a mean is the
larger of the spread the group shows and the seed noise the baseline measured, over sqrt(n), and a
verdict ("better", "worse", "within noise") says whether the mean clears `noise_z` standard errors.
The views (`by`):

- `knob`: each value of a knob, over every run that set it (marginal means, as in a slice plot);
- `pair`: two knobs' values together, with the interaction (observed minus the additive prediction
  from each knob alone at the other's baseline value) where the cells for it exist;
- `edit`: each kind of edit (the knobs it changed, a code edit, a combine) against the run's parent;
- `parent`: the children of each parent: how many, how many beat it, the mean change;
- `kind`: each device kind: raw val_bpb, the baseline there, and the relative score;
- `runs`: the matching runs themselves.

Filters narrow any view: `knob` (runs that changed it), `parent`, `idea` (words of the hypothesis or
the reflection), `device_kind`. The searcher maintains all of it from `tell`; the model only asks.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from searchers.claude_board import AGENT, code_key
from study.core import KnobError, read_knobs, write_knobs

if TYPE_CHECKING:
    from searchers.claude_board import Board, Run

VIEWS = ("knob", "pair", "edit", "parent", "kind", "runs")
MAX_ROWS = 40


class AnalysisError(ValueError):
    """Bad arguments, returned to the model as a tool error."""


def analyze(board: "Board", args: dict[str, Any]) -> str:
    by = str(args.get("by") or "knob")
    if by not in VIEWS:
        raise AnalysisError(f"by must be one of {', '.join(VIEWS)}")
    ev = Evidence(board)
    runs = ev.select(args)
    if not runs:
        return "(no finished ok run matches; the baseline must have run on a kind before its runs are judged)"
    out = {"knob": ev.by_knob, "pair": ev.by_pair, "edit": ev.by_edit, "parent": ev.by_parent,
           "kind": ev.by_kind, "runs": ev.rows}[by](runs, args)
    lines = out.splitlines()
    if len(lines) > MAX_ROWS + 2:
        lines = lines[:MAX_ROWS + 1] + [f"... ({len(lines) - MAX_ROWS - 1} more rows; narrow with a filter)"]
    return "\n".join(lines)


class Evidence:
    def __init__(self, board: "Board"):
        self.board = board
        self.knobs_cache: dict[str, dict[str, Any]] = {}
        self.base_knobs = read_knobs(board.baseline_source)
        sigmas = [s for s in (board.sigma(k) for k in {r.device_kind for r in board.runs.values()}) if s]
        self.noise = max(sigmas) if sigmas else board.noise_margin / (board.noise_z * math.sqrt(2))

    # -- selection ---------------------------------------------------------------------------------
    def judged(self) -> list["Run"]:
        b = self.board
        return sorted((r for r in b.runs.values() if r.ok and b.baseline_mean(r.device_kind) is not None),
                      key=lambda r: r.index)

    def select(self, args: dict[str, Any]) -> list["Run"]:
        runs = self.judged()
        knob, parent = args.get("knob"), args.get("parent")
        idea, kind = str(args.get("idea") or "").lower(), args.get("device_kind")
        if knob and args.get("by", "knob") not in ("knob", "pair"):
            if knob not in self.base_knobs:
                raise AnalysisError(f"{knob!r} is not a knob of the baseline")
            runs = [r for r in runs if self.knobs(r).get(knob) != self.base_knobs[knob]]
        if parent:
            runs = [r for r in runs if (r.parent or "baseline") == parent]
        if idea:
            runs = [r for r in runs if idea in f"{r.hypothesis} {r.reflection}".lower()]
        if kind:
            runs = [r for r in runs if r.device_kind == kind]
        return runs

    def knobs(self, run: "Run") -> dict[str, Any]:
        if run.code not in self.knobs_cache:
            try:
                self.knobs_cache[run.code] = read_knobs(run.source)
            except (KnobError, SyntaxError, ValueError):
                self.knobs_cache[run.code] = {}
        return self.knobs_cache[run.code]

    def delta(self, run: "Run") -> float:
        return self.board.relative(run)

    # -- statistics --------------------------------------------------------------------------------
    def stats(self, values: list[float]) -> tuple[int, float, float, str]:
        """(n, mean, standard error, verdict against zero)."""
        n, mean = len(values), statistics.fmean(values)
        spread = statistics.stdev(values) if n >= 2 else 0.0
        se = max(spread, self.noise) / math.sqrt(n)
        z = self.board.noise_z
        verdict = "better" if mean + z * se < 0 else "worse" if mean - z * se > 0 else "within noise"
        return n, mean, se, verdict

    def row(self, label: str, values: list[float], *extra: str) -> str:
        n, mean, se, verdict = self.stats(values)
        return "\t".join([label, str(n), f"{mean:+.4f}", f"{se:.4f}", f"{min(values):+.4f}", verdict, *extra])

    # -- views -------------------------------------------------------------------------------------
    def by_knob(self, runs: list["Run"], args: dict[str, Any]) -> str:
        wanted = args.get("knob")
        if wanted and wanted not in self.base_knobs:
            raise AnalysisError(f"{wanted!r} is not a knob of the baseline")
        lines = ["knob\tvalue\tn\tmean_vs_baseline\tse\tbest\tverdict"]
        for knob in [wanted] if wanted else sorted(self.base_knobs):
            groups: dict[str, list[float]] = defaultdict(list)
            for r in runs:
                if knob in self.knobs(r):
                    groups[_fmt(self.knobs(r)[knob])].append(self.delta(r))
            if len(groups) < 2 and not wanted:
                continue  # a knob nobody changed says nothing
            base = _fmt(self.base_knobs[knob])
            for value, deltas in sorted(groups.items(), key=lambda kv: statistics.fmean(kv[1])):
                mark = " (baseline)" if value == base else ""
                lines.append(f"{knob}\t{value}{mark}\t" + self.row("", deltas).split("\t", 1)[1])
        return "\n".join(lines) if len(lines) > 1 else "(every run so far keeps the baseline's knob values)"

    def by_pair(self, runs: list["Run"], args: dict[str, Any]) -> str:
        pair = args.get("knobs")
        if not (isinstance(pair, list) and len(pair) == 2 and all(k in self.base_knobs for k in pair)):
            raise AnalysisError("pair needs knobs: [two knob names of the baseline]")
        a, b = pair
        cells: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in runs:
            k = self.knobs(r)
            if a in k and b in k:
                cells[(_fmt(k[a]), _fmt(k[b]))].append(self.delta(r))
        mean = {cell: statistics.fmean(v) for cell, v in cells.items()}
        a0, b0 = _fmt(self.base_knobs[a]), _fmt(self.base_knobs[b])
        lines = [f"{a}\t{b}\tn\tmean_vs_baseline\tse\tbest\tverdict\tinteraction"]
        for (va, vb), deltas in sorted(cells.items(), key=lambda kv: mean[kv[0]]):
            parts = [(va, b0), (a0, vb), (a0, b0)]
            interaction = "-"
            if va != a0 and vb != b0 and all(p in mean for p in parts):
                predicted = mean[(va, b0)] + mean[(a0, vb)] - mean[(a0, b0)]
                interaction = f"{mean[(va, vb)] - predicted:+.4f}"
            lines.append(f"{va}\t{vb}\t" + self.row("", deltas, interaction).split("\t", 1)[1])
        return "\n".join(lines)

    def by_edit(self, runs: list["Run"], args: dict[str, Any]) -> str:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            parent = self.board.runs.get(r.parent or "")
            if r.role != AGENT or parent is None:
                continue
            before = [self.delta(p) for p in self.judged() if p.code == parent.code]
            if before:
                groups[self.edit_kind(r, parent)].append(self.delta(r) - statistics.fmean(before))
        lines = ["edit\tn\tmean_vs_parent\tse\tbest\tverdict\timproved"]
        for kind, changes in sorted(groups.items(), key=lambda kv: statistics.fmean(kv[1])):
            lines.append(self.row(kind, changes, f"{sum(c < 0 for c in changes)}/{len(changes)}"))
        return "\n".join(lines) if len(lines) > 1 else "(no judged child of a finished parent yet)"

    def edit_kind(self, run: "Run", parent: "Run") -> str:
        if run.meta.get("combines"):
            return "combine"
        mine, theirs = self.knobs(run), self.knobs(parent)
        changed = sorted(k for k in mine if theirs.get(k, object()) != mine[k])
        try:
            same_code = code_key(write_knobs(parent.source, {k: mine[k] for k in changed if k in theirs}))
        except (KnobError, SyntaxError, ValueError):
            same_code = ""
        edited = same_code != run.code
        return " + ".join([*(["code edit"] if edited else []), *(f"knob {k}" for k in changed)]) or "re-run"

    def by_parent(self, runs: list["Run"], args: dict[str, Any]) -> str:
        groups: dict[str, list["Run"]] = defaultdict(list)
        for r in runs:
            if r.role == AGENT:
                groups[r.parent or "baseline"].append(r)
        lines = ["parent\tn\tmean_vs_baseline\tse\tbest\tverdict\tbeat_parent"]
        for parent, children in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            ref = self.board.runs.get(parent)
            base = [self.delta(p) for p in self.judged() if ref is not None and p.code == ref.code]
            level = statistics.fmean(base) if base else 0.0
            better = sum(self.delta(c) < level for c in children)
            lines.append(self.row(parent, [self.delta(c) for c in children], f"{better}/{len(children)}"))
        return "\n".join(lines)

    def by_kind(self, runs: list["Run"], args: dict[str, Any]) -> str:
        groups: dict[str, list["Run"]] = defaultdict(list)
        for r in runs:
            groups[r.device_kind or "?"].append(r)
        lines = ["device_kind\tn\tmean_vs_baseline\tse\tbest\tverdict\tmean_val_bpb\tbaseline_there"]
        for kind, rs in sorted(groups.items()):
            base = self.board.baseline_mean(None if kind == "?" else kind)
            lines.append(self.row(kind, [self.delta(r) for r in rs], f"{statistics.fmean(r.score for r in rs):.4f}",
                                  "-" if base is None else f"{base:.4f}"))
        return "\n".join(lines)

    def rows(self, runs: list["Run"], args: dict[str, Any]) -> str:
        lines = ["trial\tdevice\tseed\tval_bpb\tvs_baseline\tparent\tidea\thypothesis"]
        for r in sorted(runs, key=self.delta)[:MAX_ROWS]:
            lines.append("\t".join([r.trial_id, r.device_kind or "-", str(r.seed), f"{r.score:.4f}",
                                    f"{self.delta(r):+.4f}", r.parent or "baseline",
                                    self.board.idea_of(r) or "baseline", " ".join(r.hypothesis.split())[:100]]))
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
