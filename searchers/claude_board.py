"""The agent's scoreboard: the frontier of near-equal elites, the incumbent among them, and why.

The keep rule is here, apart from any API code, because it is what makes an agent's "improvement"
trustworthy. Three ideas, each answering a way a search fools itself:

- Noise is measured, not assumed. The baseline runs under `noise_seeds` seeds at the start (on
  every device kind, when the budget is in seconds); the spread of those runs (or a stored noise
  floor, see analysis/noise.py) gives sigma per kind, and the margin a single run must win by is
  `noise_z` standard deviations of the difference of two runs (noise_z x sigma x sqrt 2). Until
  sigma is known the configured `noise_margin` stands in.
- Hardware is never credited. Under a seconds budget a faster device trains more tokens, so every
  score is judged as its difference from the baseline's mean on the same device kind (a "tier");
  a candidate run on an H200 is compared with the baseline on an H200. Under a steps or tokens
  budget the kind does not change the work done and all kinds form one tier.
- A lucky seed is not a win. A candidate that beats the incumbent by less than the margin is
  confirmed on `confirm_seeds` fresh seeds, and the incumbent is re-run on the same seeds (or its
  earlier runs on them are reused); only those fresh, paired runs decide, never the run that made
  it a challenger.

The frontier keeps up to `max_elites` candidates within the margin of the incumbent (population
search beats keep-the-best hill-climbing: a near-equal idea is a starting point, not a loss), plus
up to `diverse_elites` slightly worse ones (within `diverse_z` margins) that try an idea no elite
tries (another set of knobs, or a code edit where the others only tune knobs): a population that
collapses onto one idea stops exploring. Each elite shows how many children were tried from it and
how many improved on it, so the agent can tell a fertile start from an exhausted one. Every run
also carries steps, tokens/s and peak memory (what made it fast or made it OOM), and the agent's
one-line reflection on it.

Everything is rebuilt from `record` (the searcher's `tell`), so a resumed study replays to the same
decisions; reflections are set again from the agent's own file.
"""
from __future__ import annotations

import ast
import difflib
import functools
import hashlib
import math
import statistics
from dataclasses import dataclass, field

from study.core import KnobError, read_knobs, write_knobs
from study.records import INFRA_STATUSES, Result, Trial
from train.knobs import parse_source

BASELINE, AGENT, CONFIRM, RERUN = "baseline", "agent", "confirm", "rerun"
ANY_KIND = "*"
META_KEPT = ("agent_wave", "combines", "screen", "promotes", "reruns", "hybrid_side")


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
    steps: int | None = None
    tokens_per_second: float | None = None
    peak_memory_mb: float | None = None
    reflection: str = ""
    meta: dict = field(default_factory=dict)  # the candidate's wave, combines, screen, promotes, hybrid side

    @property
    def ok(self) -> bool:
        return math.isfinite(self.score)


@dataclass
class Elite:
    """A candidate on the frontier and the runs its standing rests on (fresh, unselected runs)."""

    trial_id: str
    code: str
    source: str
    evidence: list[Run]
    diverse: bool = False  # kept for its different idea, though slightly worse than the margin allows


@dataclass
class ConfirmJob:
    """A re-run to issue as a candidate: of the challenger, or of the incumbent on the same seed."""

    challenger: str
    of: str  # the trial whose code runs
    source: str
    seed: int
    device_kind: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.challenger, self.of, self.seed


@dataclass
class _Challenge:
    incumbent: str
    seeds: list[int]
    device_kind: str | None
    runs: list[Run] = field(default_factory=list)


class Board:
    def __init__(self, baseline_source: str, *, noise_margin: float, confirm_seeds: int, kind_sensitive: bool,
                 wait_for_baseline: bool, noise_z: float = 2.0, max_elites: int = 4,
                 stored_sigma: dict[str, float] | None = None, diverse_elites: int = 0, diverse_z: float = 2.0):
        self.baseline_source = baseline_source
        self.baseline_code = code_key(baseline_source)
        self.noise_margin = float(noise_margin)
        self.noise_z = float(noise_z)
        self.confirm_seeds = int(confirm_seeds)
        self.kind_sensitive = kind_sensitive
        self.wait_for_baseline = wait_for_baseline
        self.max_elites = int(max_elites)
        self.diverse_elites, self.diverse_z = int(diverse_elites), float(diverse_z)
        self.stored_sigma = dict(stored_sigma or {})
        self.runs: dict[str, Run] = {}
        self.baselines: dict[str, list[Run]] = {}  # tier -> the baseline's ok runs there
        self.elites: list[Elite] = []
        self.best_id: str | None = None
        self.challenges: dict[str, _Challenge] = {}
        self.waiting: list[Run] = []  # judged once their tier's baseline is known
        self.kept: list[str] = []
        self.reflections: dict[str, str] = {}

    # -- tiers and noise ---------------------------------------------------------------------------
    def tier(self, kind: str | None) -> str:
        return (kind or ANY_KIND) if self.kind_sensitive else ANY_KIND

    def sigma(self, kind: str | None) -> float | None:
        """The seed noise of one run on this kind: stored, else measured from the baseline's seeds."""
        tier = self.tier(kind)
        if tier in self.stored_sigma:
            return self.stored_sigma[tier]
        scores = [r.score for r in self.baselines.get(tier, [])]
        return statistics.stdev(scores) if len(scores) >= 2 else None

    def margin(self, kind: str | None) -> float:
        sigma = self.sigma(kind)
        return self.noise_margin if sigma is None else self.noise_z * sigma * math.sqrt(2)

    def baseline_mean(self, kind: str | None) -> float | None:
        runs = self.baselines.get(self.tier(kind))
        if runs:
            return statistics.fmean(r.score for r in runs)
        return None if self.wait_for_baseline else 0.0

    def relative(self, run: Run) -> float:
        """The run's val_bpb minus the baseline's mean on its tier: what the code, not the
        hardware, bought."""
        return run.score - self.baseline_mean(run.device_kind)

    def elite_score(self, elite: Elite) -> float:
        return statistics.fmean(self.relative(r) for r in elite.evidence)

    # -- what the searcher tells ------------------------------------------------------------------
    def record(self, trial: Trial, result: Result) -> Run:
        c = trial.candidate
        role = c.meta.get("role") or (BASELINE if c.source == self.baseline_source else AGENT)
        run = Run(
            trial_id=trial.trial_id, index=trial.index, source=c.source, parent=c.parent,
            hypothesis=c.hypothesis, role=role, seed=trial.seed if c.seed is None else c.seed,
            device_kind=result.device_kind or trial.device_kind or c.device_kind, status=result.status,
            score=result.score(), directory=trial.directory, knobs=dict(c.knobs), code=code_key(c.source),
            confirms=c.meta.get("confirms"), error=(result.reason or result.error or "")[-300:],
            steps=result.num_steps, tokens_per_second=result.tokens_per_second, peak_memory_mb=result.peak_memory_mb,
            reflection=self.reflections.get(trial.trial_id, ""),
            meta={k: c.meta[k] for k in META_KEPT if k in c.meta},
        )
        self.runs[run.trial_id] = run
        if result.status in INFRA_STATUSES:
            run.decision = f"{result.status}: not judged (the infrastructure failed, not the candidate)"
        elif role == BASELINE:
            self._on_baseline(run)
        elif role in (CONFIRM, RERUN):
            if run.ok and run.code == self.baseline_code:
                self._measure_baseline(run)
            self._on_confirmation(run) if role == CONFIRM else self._on_rerun(run)
        else:
            self._judge(run)
        return run

    def reflect(self, trial_id: str, text: str) -> None:
        self.reflections[trial_id] = text
        if trial_id in self.runs:
            self.runs[trial_id].reflection = text

    def _on_baseline(self, run: Run) -> None:
        run.decision = f"baseline (seed {run.seed})" if run.ok else f"baseline {run.status}"
        if run.ok:
            self._measure_baseline(run)

    def _measure_baseline(self, run: Run) -> None:
        """Any ok run of the baseline's code (a noise seed, an incumbent re-run) refines the
        baseline's mean and spread on its tier; waiting runs are judged once a tier has one."""
        self.baselines.setdefault(self.tier(run.device_kind), []).append(run)
        base = self._elite(self.baseline_code)
        if base is None and self.best_id is None:
            base = Elite(run.trial_id, run.code, run.source, [run])
            self.elites.append(base)
            self._make_best(base, run, "baseline: the reference")
        elif base is not None and run not in base.evidence:
            base.evidence.append(run)
        waiting, self.waiting = self.waiting, []
        for r in waiting:
            self._judge(r)

    def _judge(self, run: Run) -> None:
        if not run.ok:
            run.decision = run.status
            return
        if self.baseline_mean(run.device_kind) is None:
            run.decision = f"waiting for the baseline on {self.tier(run.device_kind)}"
            self.waiting.append(run)
            return
        best = self.best_elite()
        if best is None:
            elite = Elite(run.trial_id, run.code, run.source, [run])
            self.elites.append(elite)
            self._make_best(elite, run, "kept: first ok result")
            return
        gain = self.elite_score(best) - self.relative(run)
        margin = self.margin(run.device_kind)
        if gain > margin:
            elite = Elite(run.trial_id, run.code, run.source, [run])
            self.elites.append(elite)
            self._make_best(elite, run, f"kept: {gain:+.4f} > margin {margin:.4f}")
        elif gain > 0 and self.confirm_seeds > 0:
            seeds = [run.seed + i for i in range(1, self.confirm_seeds + 1)]
            kind = run.device_kind if self.kind_sensitive else None
            self.challenges[run.trial_id] = _Challenge(best.trial_id, seeds, kind)
            run.decision = f"confirming: {gain:+.4f} within noise {margin:.4f}; {len(seeds)} fresh seeds, paired"
        elif gain > -margin:
            run.decision = self._join_frontier(run, [run], f"{gain:+.4f} within noise {margin:.4f}")
        elif gain > -self.diverse_z * margin and self._room_for_diversity(run):
            self.elites.append(Elite(run.trial_id, run.code, run.source, [run], diverse=True))
            run.decision = (f"diverse elite: {gain:+.4f}, slightly worse but tries "
                            f"{self.idea_of(run) or 'the baseline'}, which no elite tries")
        else:
            run.decision = f"discarded: {gain:+.4f}"

    def _on_confirmation(self, run: Run) -> None:
        ch = self.challenges.get(run.confirms)
        of_challenger = run.code == self.runs[run.confirms].code if run.confirms in self.runs else False
        run.decision = f"re-run of {run.confirms}" if of_challenger else f"incumbent re-run for {run.confirms}"
        if not of_challenger:
            self._add_evidence(run)
        if ch is None:
            return
        ch.runs.append(run)
        pairs, missing = self._pairs(run.confirms, ch)
        failed = [r for r in ch.runs if r.code == self.runs[run.confirms].code and not r.ok]
        challenger = self.runs[run.confirms]
        if failed:
            del self.challenges[run.confirms]
            challenger.decision = f"rejected: re-run {failed[0].trial_id} {failed[0].status}"
            return
        if missing:
            return
        del self.challenges[run.confirms]
        fresh = [c for _, c in pairs]
        mean_gain = statistics.fmean(self.relative(i) - self.relative(c) for i, c in pairs) if pairs else -math.inf
        margin = self.margin(ch.device_kind)
        summary = f"paired gain {mean_gain:+.4f} over {len(pairs)} fresh seeds"
        best = self.best_elite()
        if not fresh:
            challenger.decision = "rejected: no paired re-run finished ok"
            return
        if best is not None and best.trial_id != ch.incumbent:  # the incumbent changed meanwhile: judge afresh
            mean_gain = self.elite_score(best) - statistics.fmean(self.relative(c) for c in fresh)
            summary = f"{mean_gain:+.4f} over {len(fresh)} fresh runs vs the new incumbent {best.trial_id}"
            if mean_gain > margin:
                self._make_best(self._new_elite(challenger, fresh), challenger, f"kept after re-runs: {summary}")
                return
        elif mean_gain > 0:
            self._make_best(self._new_elite(challenger, fresh), challenger, f"kept after re-runs: {summary}")
            return
        if mean_gain > -margin:
            challenger.decision = self._join_frontier(challenger, fresh, f"not better after re-runs: {summary}")
        else:
            challenger.decision = f"rejected after re-runs: {summary}"

    def _pairs(self, challenger_id: str, ch: _Challenge) -> tuple[list[tuple[Run, Run]], list[int]]:
        """(incumbent run, challenger run) per fresh seed on the challenge's tier, and the seeds
        still missing one of the two."""
        challenger, incumbent = self.runs[challenger_id], self.runs[ch.incumbent]
        pairs, missing = [], []
        for seed in ch.seeds:
            c = self._run_of(challenger.code, seed, ch.device_kind, roles=(CONFIRM,))
            i = self._run_of(incumbent.code, seed, ch.device_kind)
            if c is None or i is None:
                missing.append(seed)
            elif c.ok and i.ok:
                pairs.append((i, c))
        return pairs, missing

    def _run_of(self, code: str, seed: int, kind: str | None, roles=(BASELINE, AGENT, CONFIRM, RERUN)) -> Run | None:
        for r in self.runs.values():
            if (r.code == code and r.seed == seed and r.role in roles and r.status not in INFRA_STATUSES
                    and self.tier(r.device_kind) == self.tier(kind)):
                return r
        return None

    def _on_rerun(self, run: Run) -> None:
        run.decision = f"re-run on {run.device_kind or 'any kind'}" + ("" if run.ok else f": {run.status}")
        if run.ok and self.baseline_mean(run.device_kind) is not None:
            self._add_evidence(run)

    def _add_evidence(self, run: Run) -> None:
        elite = self._elite(run.code)
        if run.ok and elite is not None and run not in elite.evidence and run.code != self.baseline_code:
            elite.evidence.append(run)

    def _new_elite(self, run: Run, evidence: list[Run]) -> Elite:
        """`evidence`, plus the re-runs of the same code (the agent's, a screened run's promotion)
        that finished before it became an elite: they were not selected, so they count."""
        later = [r for r in self.runs.values() if r.role == RERUN and r.code == run.code and r.ok
                 and r not in evidence and self.baseline_mean(r.device_kind) is not None]
        elite = self._elite(run.code)
        if elite is None:
            elite = Elite(run.trial_id, run.code, run.source, list(evidence) + later)
            self.elites.append(elite)
        else:
            elite.evidence = list(evidence) + later
        return elite

    def _join_frontier(self, run: Run, evidence: list[Run], why: str) -> str:
        near = [e for e in self.elites if not e.diverse]
        if self._elite(run.code) is None and len(near) >= self.max_elites:
            worst = max((e for e in near if e.trial_id != self.best_id), key=self.elite_score, default=None)
            score = statistics.fmean(self.relative(r) for r in evidence)
            if worst is None or self.elite_score(worst) <= score:
                return f"discarded: {why}, frontier full"
            self.elites.remove(worst)
            self.runs[worst.trial_id].decision += f"; left the frontier for {run.trial_id}"
        self._new_elite(run, evidence).diverse = False
        return f"elite: {why}"

    def _make_best(self, elite: Elite, run: Run, why: str) -> None:
        self.best_id = elite.trial_id
        self.kept.append(elite.trial_id)
        elite.diverse = False
        run.decision = why
        best, margin = self.elite_score(elite), self.margin(run.device_kind)
        ranked = sorted((e for e in self.elites if e is not elite and self.elite_score(e) - best <= margin),
                        key=self.elite_score)
        near = [e for e in ranked if not e.diverse][: self.max_elites - 1]
        diverse = sorted((e for e in self.elites if e is not elite and e not in near
                          and self.elite_score(e) - best <= self.diverse_z * margin), key=self.elite_score)
        kept_ideas = {self.idea_of(self.runs[e.trial_id]) for e in [elite, *near]}
        for e in diverse:
            e.diverse = True
        diverse = [e for e in diverse if self.idea_of(self.runs[e.trial_id]) not in kept_ideas]
        self.elites = [elite] + near + diverse[: self.diverse_elites]

    def _room_for_diversity(self, run: Run) -> bool:
        """A free diverse place, and an idea no elite tries."""
        if sum(e.diverse for e in self.elites) >= self.diverse_elites:
            return False
        return self.idea_of(run) not in {self.idea_of(self.runs[e.trial_id]) for e in self.elites}

    def idea_of(self, run: Run) -> str:
        """What a run tries against the baseline, coarsely: the knobs it sets differently, and
        whether it edits code (the baseline's code with the run's knob values is not its code)."""
        ideas = getattr(self, "_ideas", None)
        if ideas is None:
            ideas = self._ideas = {}
        if run.code not in ideas:
            try:
                knobs, base = read_knobs(run.source), read_knobs(self.baseline_source)
                changed = sorted(k for k, v in knobs.items() if base.get(k, object()) != v)
                edited = code_key(write_knobs(self.baseline_source, {k: knobs[k] for k in changed if k in base})) != run.code
            except (KnobError, SyntaxError, ValueError):
                changed, edited = [], True
            ideas[run.code] = " + ".join([*(["code edit"] if edited else []), *changed])
        return ideas[run.code]

    def elite_stats(self, elite: Elite) -> tuple[int, int]:
        """(children tried from this elite, children that beat it): how fertile a start it is."""
        children = [r for r in self.runs.values() if r.parent == elite.trial_id and r.role == AGENT
                    and r.status not in INFRA_STATUSES]
        score = self.elite_score(elite)
        better = [r for r in children if r.ok and self.baseline_mean(r.device_kind) is not None
                  and self.relative(r) < score]
        return len(children), len(better)

    def _elite(self, code: str) -> Elite | None:
        return next((e for e in self.elites if e.code == code), None)

    # -- what the searcher asks ------------------------------------------------------------------
    def best_elite(self) -> Elite | None:
        return next((e for e in self.elites if e.trial_id == self.best_id), None)

    def best(self) -> Run | None:
        return self.runs.get(self.best_id) if self.best_id else None

    def best_score(self) -> float:
        """The incumbent's mean val_bpb over its evidence (for display; decisions use `relative`)."""
        elite = self.best_elite()
        return statistics.fmean(r.score for r in elite.evidence) if elite and elite.evidence else math.inf

    def best_kind(self) -> str | None:
        elite = self.best_elite()
        return elite.evidence[0].device_kind if elite and elite.evidence else None

    def best_source(self) -> str:
        b = self.best()
        return b.source if b else self.baseline_source

    def frontier(self) -> list[tuple[Elite, float]]:
        """The elites, incumbent first, with their score relative to the baseline."""
        return [(e, self.elite_score(e)) for e in self.elites if e.evidence]

    def confirmations_due(self, issued: set[tuple[str, str, int]]) -> list[ConfirmJob]:
        """Re-runs not yet told, in flight or issued (`issued` holds ConfirmJob keys)."""
        jobs = []
        for cid, ch in self.challenges.items():
            challenger, incumbent = self.runs[cid], self.runs[ch.incumbent]
            for seed in ch.seeds:
                for who in (challenger, incumbent):
                    roles = (CONFIRM,) if who is challenger else (BASELINE, AGENT, CONFIRM, RERUN)
                    job = ConfirmJob(cid, who.trial_id, who.source, seed, ch.device_kind)
                    if job.key not in issued and self._run_of(who.code, seed, ch.device_kind, roles) is None:
                        jobs.append(job)
        return jobs

    def baseline_seeds_due(self, tiers: list[str], seeds: list[int], issued: set[tuple[str, int]]) -> list[tuple[str, int]]:
        """(tier, seed) baseline runs the noise measurement still needs."""
        have = {(self.tier(r.device_kind), r.seed) for r in self.runs.values()
                if r.code == self.baseline_code and r.status not in INFRA_STATUSES}
        return [(t, s) for t in tiers for s in seeds if (t, s) not in have and (t, s) not in issued]

    def owner_of(self, source: str, key: str | None = None) -> str | None:
        """The trial that already ran this code, comments and layout aside (not counting re-runs);
        `key` is its code_key if the caller has it (computing one parses the file)."""
        key = key or code_key(source)
        for r in self.runs.values():
            if r.code == key and r.role not in (CONFIRM, RERUN) and r.status not in INFRA_STATUSES:
                return r.trial_id
        return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs.values():
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def noise_lines(self, kinds: list[str]) -> list[str]:
        lines = []
        for tier in sorted({self.tier(k) for k in kinds} or {ANY_KIND}):
            kind = None if tier == ANY_KIND else tier
            sigma = self.sigma(kind)
            n = len(self.baselines.get(tier, []))
            source = ("stored noise floor" if tier in self.stored_sigma else f"{n} baseline seed(s)")
            where = "all kinds" if tier == ANY_KIND else tier
            lines.append(f"- {where}: sigma {sigma:.4f} from {source}; keep margin {self.margin(kind):.4f}"
                         if sigma is not None else
                         f"- {where}: sigma not measured yet ({n} baseline run(s)); keep margin {self.margin(kind):.4f} "
                         "(configured)")
        return lines

    def frontier_lines(self) -> list[str]:
        lines = []
        for elite, score in self.frontier():
            role = "incumbent" if elite.trial_id == self.best_id else "diverse elite" if elite.diverse else "elite"
            kinds = sorted({r.device_kind or "?" for r in elite.evidence})
            children, better = self.elite_stats(elite)
            lines.append(f"- {elite.trial_id} ({role}): {score:+.4f} vs baseline over {len(elite.evidence)} run(s) "
                         f"on {', '.join(kinds)}; children tried {children}, improved on it {better}; "
                         f"{_one_line(self.runs[elite.trial_id].hypothesis, 100)}")
        return lines

    def table(self, *, top: int = 10, last: int = 20, ids: list[str] | None = None) -> str:
        """A TSV of the best `top` runs by val_bpb, then the `last` finished, without repeats."""
        runs = sorted(self.runs.values(), key=lambda r: r.index)
        if ids:
            chosen = [self.runs[i] for i in ids if i in self.runs]
        else:
            best = sorted((r for r in runs if r.ok), key=lambda r: r.score)[:max(0, top)]
            recent = runs[-last:] if last > 0 else []
            chosen = best + [r for r in recent if r not in best]
        elite = self.best_elite()
        ref = self.elite_score(elite) if elite and elite.evidence else None
        lines = ["trial\tstatus\tval_bpb\tvs_best\tdevice\tseed\tsteps\ttok/s\tpeak_mb\tparent\tdecision\t"
                 "hypothesis\treflection"]
        for r in chosen:
            judged = r.ok and ref is not None and self.baseline_mean(r.device_kind) is not None
            lines.append("\t".join([
                r.trial_id, r.status, f"{r.score:.4f}" if r.ok else "-",
                f"{self.relative(r) - ref:+.4f}" if judged else "-", r.device_kind or "-", str(r.seed),
                _num(r.steps, "{:d}"), _num(r.tokens_per_second, "{:.0f}"), _num(r.peak_memory_mb, "{:.0f}"),
                r.parent or "baseline", r.decision, _one_line(r.hypothesis, 120), _one_line(r.reflection, 120)]))
        return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def code_key(source: str) -> str:
    """Equal for two sources that differ only in comments, blank lines or layout, which would run
    the same training: resubmitting one is a seed re-roll, not an idea. Cached: the same sources
    are keyed again and again (queue, proposals, board), and parsing is the wave's main cost."""
    try:
        text = ast.dump(parse_source(source))
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


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(int(value) if fmt == "{:d}" else value)


def _one_line(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
