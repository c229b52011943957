"""Successive halving in the restart style, around any searcher (`study.rungs`, `study.eta`).

train.py's schedules run on the fraction of the budget spent, so a 300 s run stopped at 60 s is
mid-warmdown and a stop-style pruner would judge it on the wrong number. Here every rung is a
*complete* run on its fraction of the budget: a candidate first runs at the lowest rung, and is
promoted to a complete run at the next rung by ASHA's asynchronous rule (Li et al. 2020): at any
ask, a rung-k result in the top 1/eta of rung k's finished results that has not been promoted yet
goes up, highest rungs first; otherwise the inner searcher proposes a fresh candidate. No rung
waits for a full wave, so no slot idles for a straggler.

What the inner searcher is told: each candidate's *lowest-rung* result, once, as the result of
the candidate it proposed. Every candidate has one, all at the same fidelity, so a sampler
compares like with like and its ask/tell bookkeeping (TPE's constant liar, a greedy's keep rule)
sees exactly one result per proposal. Telling it the promoted runs too would show a sampler the
same point twice at two fidelities, and telling it only top-rung results would leave it learning
from 1/eta^2 of the candidates and holding most of its trials open for ever. The cost of the
choice is that a sampler learns the screening rung's ranking; the promotions and the rank fidelity
below (Kendall tau between a candidate's scores at consecutive rungs, on the parent run, with a
warning when low) say how far that ranking can be trusted.

Rung state is a function of the journal: a trial's candidate carries its rung and lineage (the
trial id of its lowest-rung run) in `meta`, so the replayed `tell`s rebuild every rung's results
and the first `ask` after a resume marks the promotions still in flight. A promotion that was
asked for but never submitted when the orchestrator died is simply promoted again.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from scipy.stats import kendalltau

from study.core import SearchContext, Searcher
from study.records import INFRA_STATUSES, Candidate, Result, Trial
from study.rungs import Rung, check_rung_kinds, parse_rungs

__all__ = ["Rung", "RungSearcher", "check_rung_kinds", "parse_rungs"]  # the schedule lives in study/rungs.py

log = logging.getLogger("arena.rungs")

# Rank fidelity below this Kendall tau, over at least MIN_TAU_PAIRS candidates, gets a warning:
# the screening rung then ranks candidates little better than a coin.
LOW_TAU = 0.3
MIN_TAU_PAIRS = 5


class RungSearcher(Searcher):
    """ASHA's promotions around `inner`, which proposes every fresh candidate."""

    def __init__(self, inner: Searcher, rungs: list[Rung], eta: int = 3):
        self.inner = inner
        self.rungs = list(rungs)
        self.eta = eta
        self.name = f"{inner.name}+rungs"
        # Per rung: lineage -> score of its finished run (inf for a failure), in finishing order.
        self.scores: list[dict[str, float]] = [{} for _ in self.rungs]
        # Per rung: lineages run, running or handed out there (never promoted there twice).
        self.started: list[set[str]] = [set() for _ in self.rungs]
        self.base: dict[str, Trial] = {}  # lineage -> its lowest-rung trial (what is promoted)
        self.promotions = [0 for _ in self.rungs]
        self._warned: set[int] = set()
        self._adopted = False

    # -- Searcher ---------------------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.inner.setup(ctx)

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        if not self._adopted:  # after a resume: promotions still running are promotions made
            self._adopted = True
            for trial in ctx.in_flight:
                rung = trial.candidate.meta.get("rung")
                if rung:
                    self.started[rung].add(trial.candidate.meta["lineage"])
        out = []
        while len(out) < n and (promoted := self._promote()) is not None:
            out.append(promoted)
        if len(out) < n and not self.inner.done():
            for candidate in self.inner.ask(n - len(out), ctx):
                out.append(self._at_lowest_rung(candidate))
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        rung = trial.candidate.meta.get("rung", 0)
        lineage = trial.candidate.meta.get("lineage") or trial.trial_id
        if rung == 0:
            self.inner.tell(trial, result)
            self.base[lineage] = trial
        if result.status in INFRA_STATUSES:
            self.started[rung].discard(lineage)  # it never ran: it may be promoted again
            return
        self.started[rung].add(lineage)
        self.scores[rung][lineage] = result.score()
        if rung > 0:
            self._check_fidelity(rung - 1)

    def done(self) -> bool:
        return self.inner.done() and self._promotable() is None

    def summary(self) -> dict[str, Any]:
        out = dict(self.inner.summary())
        for k, rung in enumerate(self.rungs):
            out[f"rung{k}_results"] = len(self.scores[k])
            if k:
                out[f"rung{k}_promotions"] = self.promotions[k]
        low = []
        for k in range(len(self.rungs) - 1):
            tau, pairs = self.rank_fidelity(k)
            out[f"rank_pairs_r{k}_r{k + 1}"] = pairs
            if not math.isnan(tau):
                out[f"rank_tau_r{k}_r{k + 1}"] = tau
                if pairs >= MIN_TAU_PAIRS and tau < LOW_TAU:
                    low.append(f"rungs {k}->{k + 1}: tau={tau:.2f} over {pairs} candidates")
        out["rungs"] = ",".join(f"{r.fraction:g}" + (f"@{r.kind}" if r.kind else "") for r in self.rungs)
        out["rank_fidelity"] = "low: " + "; ".join(low) if low else "ok"
        return out

    def close(self) -> None:
        self.inner.close()

    # -- the rule ---------------------------------------------------------------------------------
    def rank_fidelity(self, k: int) -> tuple[float, int]:
        """Kendall tau between the scores of the candidates that finished both rung k and k+1
        (failures left out), and how many there are."""
        both = [lin for lin, s in self.scores[k + 1].items()
                if math.isfinite(s) and math.isfinite(self.scores[k].get(lin, math.inf))]
        if len(both) < 2:
            return math.nan, len(both)
        tau = kendalltau([self.scores[k][lin] for lin in both], [self.scores[k + 1][lin] for lin in both]).statistic
        return float(tau), len(both)

    def _promotable(self) -> tuple[int, str] | None:
        """(rung to promote to, lineage): the best unpromoted result in the top 1/eta of its rung,
        from the highest rung down, so candidates closest to a full result finish first."""
        for k in range(len(self.rungs) - 2, -1, -1):
            finished = self.scores[k]
            quota = len(finished) // self.eta
            ranked = sorted(finished, key=finished.get)[:quota]  # stable: ties by finishing order
            for lineage in ranked:
                if math.isfinite(finished[lineage]) and lineage not in self.started[k + 1]:
                    return k + 1, lineage
        return None

    def _promote(self) -> Candidate | None:
        found = self._promotable()
        if found is None:
            return None
        rung, lineage = found
        self.started[rung].add(lineage)
        self.promotions[rung] += 1
        base = self.base[lineage].candidate
        target = self.rungs[rung]
        return dataclasses.replace(
            base, budget_fraction=target.fraction, device_kind=target.kind or base.device_kind,
            meta={**base.meta, "rung": rung, "lineage": lineage},
            hypothesis=f"rung {rung} ({target.fraction:g} of the budget): {lineage} was in the top 1/{self.eta} "
                       f"of rung {rung - 1}. {base.hypothesis}")

    def _at_lowest_rung(self, candidate: Candidate) -> Candidate:
        rung = self.rungs[0]
        candidate.budget_fraction = rung.fraction
        candidate.device_kind = rung.kind or candidate.device_kind
        candidate.meta = {**candidate.meta, "rung": 0}
        return candidate

    def _check_fidelity(self, k: int) -> None:
        tau, pairs = self.rank_fidelity(k)
        if k not in self._warned and pairs >= MIN_TAU_PAIRS and tau < LOW_TAU:
            self._warned.add(k)
            log.warning("rank fidelity is low: Kendall tau %.2f between rungs %d and %d over %d candidates; "
                        "the shorter runs rank candidates little better than chance here", tau, k, k + 1, pairs)
