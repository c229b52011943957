"""searcher=hybrid: an Optuna sampler and the Claude agent share one study ("Centaur").

The best published result on this task came from neither alone: CMA-ES proposed most trials and
an LLM, shown CMA-ES's mean, sigma and top configurations, proposed about 30%. Here:

- The sampler (CMA-ES by default, TPE selectable) owns `share` of the proposals, the agent the
  rest; each ask hands every slot to the side furthest below its share so far, so the split holds
  over the whole study, across resumes (every trial's side is in its candidate's meta). Only
  proposals count: the baseline's noise seeds, the keep rule's confirmations and the agent's
  re-runs and promotions run on the agent's side but are evidence about others' code, not ideas.
- The agent's wave prompt carries the sampler's state: the knobs it tunes, its top configurations
  and, for CMA-ES, the search distribution's mean and 1-sigma range per knob.
- The agent may propose knob values or code edits. Knob values inside the space on the sampler's
  code are enqueued into the sampler's Optuna study and run as its trials (Optuna's enqueue_trial),
  so TPE learns from them and CMA-ES counts them in its current generation (an injected solution). Any other result on the
  sampler's code is added to its study as a finished trial (add_trial).
- A sampler tunes knobs on one code base. The active code base is that of the study's best, and
  the best is the agent's incumbent (its keep rule): a margin over the baseline's seed noise, judged
  against the baseline on the same device kind, confirmed on fresh seeds when close. One lucky seed
  or a faster GPU never moves the sampler. When an agent code edit becomes the incumbent, a sampler
  for that code starts (its own Optuna study, seeded with every result already on that code) and
  the sampler's share goes on tuning knobs on top of it; a CMA-ES there carries the old one's
  adaptation over (searchers/cma_carry.py: step size, covariance, the mean at the same offset from
  the new incumbent). Each candidate's meta records its code base.
- Every result goes to the agent (its scoreboard, keep rule and results table) and to the sampler
  of that result's code base. Under `study.rungs` both hear each candidate's lowest-rung result
  (searchers/rungs.py), and the best that moves the sampler is the best at that fidelity.

Resume: the journal's replayed tells rebuild the sides' counts, the best and the active code base;
each code base's Optuna study persists under its own name in `optuna.db`. The agent is reached
through its entry point for other searchers, `ClaudeSearcher.propose(k, ctx, extra_context)` (one
wave, the sampler's state added to its opening prompt), after what it hands out without a model
call (baseline noise seeds, the keep rule's re-runs). With `background` (the default) the wave runs
on a thread while the sampler fills every free slot, and its candidates are handed out on the
agent's next turns; the deficit rule gives the agent its share back as they arrive. Under the
simulated launcher that thinking costs no virtual time, so `background: false` runs the wave
inside the ask, where the loop charges it to the virtual clock (and where no slot starts while the
agent thinks, as in the Centaur setup).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import warnings
from concurrent.futures import Future
from typing import Any

from optuna.trial import TrialState

from searchers import space as sp
from searchers.claude import ClaudeSearcher
from searchers.claude_board import BASELINE, CONFIRM, RERUN, code_key
from searchers.cma_carry import CarriedCmaEsSampler, carried_state
from searchers.optuna_search import LABELS, OptunaSearcher
from study.core import KnobError, SearchContext, Searcher
from study.records import INFRA_STATUSES, Candidate, Result, Trial

log = logging.getLogger("arena.hybrid")

SAMPLER, AGENT = "sampler", "agent"
TOP_CONFIGS = 5
OVERHEAD = (BASELINE, CONFIRM, RERUN)  # roles handed out on the agent's side that are not proposals
CARRIED = "carried_cma"  # the Optuna study attribute holding the adaptation a code base started from


class HybridSearcher(Searcher):
    def __init__(self, agent: ClaudeSearcher, sampler: str = "cmaes", sampler_options: dict | None = None,
                 share: float = 0.7, background: bool = True, name: str = "hybrid", storage_file: str = "optuna.db"):
        if sampler not in ("cmaes", "tpe"):
            raise ValueError(f"hybrid sampler must be cmaes or tpe, not {sampler!r}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"hybrid share must be in [0, 1], not {share!r}")
        self.name = name
        self.agent = agent
        self.sampler_name = sampler
        self.sampler_options = sp.plain(sampler_options or {})
        self.share = float(share)
        self.background = bool(background)
        self.storage_file = storage_file
        self._wave: Future | None = None  # the agent's wave thinking beside the trials
        self._waiting: list[Candidate] = []  # what that wave proposed, handed out on the agent's turns
        self.samplers: dict[str, OptunaSearcher] = {}  # code base key -> its sampler
        self.on_base: dict[str, list[tuple[Trial, Result]]] = {}  # code base key -> results on it
        self.proposed = {SAMPLER: 0, AGENT: 0}  # proposals only: what the share is about
        self.overhead = 0  # baseline seeds, confirmations, re-runs and promotions
        self.improvements = {SAMPLER: 0, AGENT: 0}
        self.best: tuple[float, str] | None = None  # (score, trial id)
        self.counted: set[str] = set()  # trial ids whose side is in `proposed`
        self._kept_seen = 0  # how many of the agent board's incumbents have been credited
        self._caught_up = False

    # -- Searcher ---------------------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.space = sp.validate_space(ctx.space, ctx.baseline_knobs)
        self.agent.setup(ctx)
        self.active = self._base_key(ctx.baseline_source)
        self.base_source = {self.active: ctx.baseline_source}
        self._sampler_for(self.active)

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        if not self._caught_up:  # after a resume, trials still running count for their side
            self._caught_up = True
            for trial in ctx.in_flight:
                if trial.trial_id not in self.counted:
                    self.counted.add(trial.trial_id)
                    self._add(trial.candidate)
        self._collect_wave()
        plan = self._plan(n)
        out: list[Candidate] = []
        if plan[AGENT] and not self.agent.done():
            with self.agent.lock:  # what the agent hands out without a model call comes first
                ready = self.agent.ready(plan[AGENT], ctx)
            while self._waiting and len(ready) < plan[AGENT]:
                ready.append(self._waiting.pop(0))
            missing = plan[AGENT] - len(ready)
            if missing > 0 and not self.background:
                ready += self.agent.propose(missing, ctx, self.sampler_state())
            elif missing > 0 and self._wave is None:  # the sampler fills the slots while the agent thinks
                self._start_wave(max(missing, self._agent_deficit(n)), ctx)
            out += [self._from_agent(candidate, ctx) for candidate in ready]
        if n > len(out):
            for candidate in self._sampler_for(self.active).ask(n - len(out), ctx):
                out.append(self._on_active_base(candidate))
        for candidate in out:
            self._add(candidate)
        return out

    def tell(self, trial: Trial, result: Result) -> None:
        self._count(trial)
        self.agent.tell(trial, result)
        key = trial.candidate.meta.get("code_base") or self._base_key(trial.candidate.source)
        self.on_base.setdefault(key, []).append((trial, result))
        if key in self.samplers:
            self._tell_sampler(self.samplers[key], trial, result)
        self._follow_incumbent()

    def _follow_incumbent(self) -> None:
        """The best is the agent board's incumbent (noise- and kind-aware); when it changes, the
        side that proposed it is credited, and the sampler moves onto its code base if that differs."""
        board = self.agent.board
        kept = board.kept  # every incumbent in turn (one tell can make two: the baseline, then a waiting run)
        for i in range(self._kept_seen, len(kept)):
            if i > 0 and kept[i] != kept[i - 1]:
                self.improvements[board.runs[kept[i]].meta.get("hybrid_side", AGENT)] += 1
        self._kept_seen = len(kept)
        run = board.best()
        if run is None or (self.best is not None and self.best[1] == run.trial_id):
            return
        previous, self.best = self.best, (board.best_score(), run.trial_id)
        key = self._base_key(run.source)
        if key != self.active:
            log.info("%s is the new incumbent on another code base: the sampler now tunes its knobs", run.trial_id)
            old, old_best = self.active, board.runs.get(previous[1]) if previous else None
            self.active = key
            self.base_source[key] = run.source
            self._sampler_for(key, carry_from=(old, old_best.source if old_best else self.base_source[old]))

    def done(self) -> bool:
        return False  # the sampler always has another point to propose

    def _start_wave(self, k: int, ctx: SearchContext) -> None:
        """The agent's wave on a thread of its own; the sampler's state is read here, on the
        loop's ask thread, so only the agent (which locks its own state) runs beside the loop."""
        state = self.sampler_state()
        self._wave = Future()

        def think(future: Future = self._wave) -> None:
            try:
                future.set_result(self.agent.propose(k, ctx, state))
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by _collect_wave
                future.set_exception(e)

        threading.Thread(target=think, name="hybrid-agent-wave", daemon=True).start()

    def _collect_wave(self) -> None:
        if self._wave is None or not self._wave.done():
            return
        wave, self._wave = self._wave, None
        if wave.exception() is not None:  # the agent's bug stops the agent, not the sampler
            log.error("agent wave failed: %s: %s", type(wave.exception()).__name__, wave.exception())
            self.agent.stop(f"wave failed: {type(wave.exception()).__name__}: {wave.exception()}")
        else:
            self._waiting.extend(wave.result())

    def summary(self) -> dict[str, Any]:
        total = sum(self.proposed.values()) or 1
        wins = sum(self.improvements.values())
        out = dict(self.agent.summary())
        out.update({
            "hybrid_sampler_trials": self.proposed[SAMPLER], "hybrid_agent_trials": self.proposed[AGENT],
            "hybrid_sampler_trial_share": self.proposed[SAMPLER] / total,
            "hybrid_overhead_trials": self.overhead,
            "hybrid_sampler_improvements": self.improvements[SAMPLER],
            "hybrid_agent_improvements": self.improvements[AGENT],
            "hybrid_code_bases": len(self.samplers),
        })
        if wins:
            out["hybrid_sampler_improvement_share"] = self.improvements[SAMPLER] / wins
        return out

    def close(self) -> None:
        self.agent.close()  # a wave still talking stops before its next call

    # -- what the agent sees --------------------------------------------------------------------
    def sampler_state(self) -> str:
        sampler = self._sampler_for(self.active)
        label = LABELS[self.sampler_name]
        base = "the baseline" if self.active == self._base_key(self.ctx.baseline_source) else \
            f"the current best ({self.best[1]})"
        lines = [f"## The sampler beside you ({label}; it proposes {self.share:.0%} of the trials, you the rest)",
                 f"It tunes {', '.join(self.space)} on top of the code of {base}. Propose knob values inside its "
                 "ranges (edit only those constants) and it runs them as its own trials and learns from them; "
                 "propose a code edit and, if it becomes the best, the sampler moves onto that code.", ""]
        done = [t for t in sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        done.sort(key=lambda t: t.value)
        lines.append(f"Its top configurations ({len(done)} finished on this code):")
        for t in done[:TOP_CONFIGS]:
            values = {k: sp.fmt(v) for k, v in t.params.items()}
            lines.append(f"- val_bpb {t.value:.4f}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        if not done:
            lines.append("- (none yet)")
        if self.sampler_name == "cmaes":
            lines += ["", cma_state(sampler)]
        return "\n".join(lines)

    # -- internals ------------------------------------------------------------------------------
    def _plan(self, n: int) -> dict[str, int]:
        """Slots for each side: each goes to the side furthest below its share so far."""
        plan = {SAMPLER: 0, AGENT: 0}
        for _ in range(n):
            total = sum(self.proposed.values()) + sum(plan.values()) + 1
            behind = self.share * total - (self.proposed[SAMPLER] + plan[SAMPLER])
            plan[SAMPLER if behind >= 0.5 or self.agent.done() else AGENT] += 1
        return plan

    def _agent_deficit(self, n: int) -> int:
        """How many proposals the agent is behind its share, counting this ask: the size of a
        background wave, so an agent that fell behind while thinking catches up in one wave."""
        total = sum(self.proposed.values()) + n
        return math.ceil((1.0 - self.share) * total - self.proposed[AGENT] - len(self._waiting))

    def _from_agent(self, candidate: Candidate, ctx: SearchContext) -> Candidate:
        """A knob-only proposal on the active code becomes an enqueued sampler trial; anything
        else runs as the agent wrote it."""
        params = self._space_values(candidate.source)
        sampler = self._sampler_for(self.active)
        if params is not None and self._base_key(candidate.source) == self.active and candidate.seed is None:
            enqueued = sampler.enqueue_knobs(params, ctx)
            if enqueued is not None:
                candidate.meta.update({k: v for k, v in enqueued.meta.items() if k.startswith("optuna")})
                candidate.meta["enqueued"] = True
                if self.sampler_name == "cmaes":
                    _inject_into_generation(sampler, enqueued.meta["optuna_trial"])
        return self._mark(candidate, AGENT)

    def _on_active_base(self, candidate: Candidate) -> Candidate:
        """OptunaSearcher writes its values into the baseline: move them onto the code it tunes."""
        candidate.source = self.ctx.with_knobs(candidate.knobs, self.base_source[self.active])
        return self._mark(candidate, SAMPLER)

    def _mark(self, candidate: Candidate, side: str) -> Candidate:
        candidate.meta["hybrid_side"] = side
        candidate.meta["code_base"] = self._base_key(candidate.source)
        return candidate

    def _sampler_for(self, key: str, carry_from: tuple[str, str] | None = None) -> OptunaSearcher:
        """The sampler of a code base, made (or reloaded from optuna.db) the first time it is needed
        and told every result already on that code. `carry_from` is (the code base the best left,
        the old incumbent's source): a CMA-ES on the new base starts from that one's adaptation."""
        if key in self.samplers:
            return self.samplers[key]
        first = not self.samplers
        options = dict(self.sampler_options)
        start = self._space_values(self.base_source[key])
        if not first and self.sampler_name == "cmaes" and start and self._inside(start):
            options["x0"] = start  # CMA-ES starts from the knob values of the new best, not the box's centre
        sampler = OptunaSearcher(name=f"{self.name}-{self.sampler_name}-{key[:10]}", sampler=self.sampler_name,
                                 options=options, storage_file=self.storage_file,
                                 enqueue_baseline=first and not getattr(self.agent, "run_baseline", False))
        with warnings.catch_warnings():  # x0 goes in Optuna 6; pyproject pins optuna < 6
            warnings.simplefilter("ignore", FutureWarning)
            sampler.setup(self.ctx)
            if self.sampler_name == "cmaes":
                self._carry(sampler, carry_from, start)
        self.samplers[key] = sampler
        for trial, result in self.on_base.get(key, []):
            self._tell_sampler(sampler, trial, result)
        return sampler

    def _carry(self, sampler: OptunaSearcher, carry_from: tuple[str, str] | None, start: dict | None) -> None:
        """Start this code base's CMA-ES from the adaptation the previous one reached, moved to the
        new incumbent: computed once and kept in the new Optuna study, so a resume starts it the same."""
        carried = sampler.study.user_attrs.get(CARRIED)
        if carried is None and carry_from is not None and start is not None and carry_from[0] in self.samplers:
            old = self.samplers[carry_from[0]]
            old_values = self._space_values(carry_from[1])
            old_center = old._params(old_values) if old_values is not None else None
            new_center = old._params(start)
            if old_center is not None and new_center is not None:
                carried = carried_state(old.study, old_center, new_center)
                if carried is not None:
                    sampler.study.set_user_attr(CARRIED, carried)
        if carried is None:
            return
        options = {k: v for k, v in self.sampler_options.items() if k not in ("x0", "sigma0", "source_trials")}
        new = CarriedCmaEsSampler(carried=carried, seed=self.ctx.seed, **options)
        sampler.study.sampler = new
        sampler.checkpoint.restore(new, len(sampler.study.get_trials(deepcopy=False)), self.ctx.seed)

    def _tell_sampler(self, sampler: OptunaSearcher, trial: Trial, result: Result) -> None:
        """A result on this sampler's code, as a trial over its space (an agent's candidate lists
        only the knobs it changed; the sampler needs them all)."""
        if result.status in INFRA_STATUSES:
            return
        params = self._space_values(trial.candidate.source)
        if params is None:
            return
        meta = trial.candidate.meta
        if not meta.get("optuna_study", sampler.name) == sampler.name:
            meta = {k: v for k, v in meta.items() if not k.startswith("optuna")}
        # at the precision OptunaSearcher matches its stored trials (its own values are written so)
        params = {k: sp.significant(v) for k, v in params.items()}
        candidate = dataclasses.replace(trial.candidate, knobs=params, meta=meta)
        sampler.tell(dataclasses.replace(trial, candidate=candidate), result)

    def _inside(self, values: dict[str, Any]) -> bool:
        for k, spec in self.space.items():
            if spec["type"] == "categorical":
                if values[k] not in spec["choices"]:
                    return False
            elif not spec["low"] <= values[k] <= spec["high"]:
                return False
        return True

    def _space_values(self, source: str) -> dict[str, Any] | None:
        try:
            knobs = SearchContext.knobs_of(source)
        except (KnobError, SyntaxError, ValueError):
            return None
        if any(k not in knobs for k in self.space):
            return None
        return sp.plain({k: knobs[k] for k in self.space})

    def _base_key(self, source: str) -> str:
        """Equal for two train.py that differ only in the sampler's knobs (and comments, layout)."""
        try:
            fixed = self.ctx.with_knobs({k: self.ctx.baseline_knobs[k] for k in self.space}, source)
        except (KnobError, SyntaxError, ValueError):
            fixed = source
        return hashlib.sha1(code_key(fixed).encode()).hexdigest()[:16]

    def _count(self, trial: Trial) -> None:
        if trial.trial_id not in self.counted:
            self.counted.add(trial.trial_id)
            if not self._caught_up:  # a replayed trial: the proposal was made before the restart
                self._add(trial.candidate)

    def _add(self, candidate: Candidate) -> None:
        """Count a handed-out candidate: a proposal for its side's share, or overhead."""
        if candidate.meta.get("role") in OVERHEAD:
            self.overhead += 1
        else:
            self.proposed[candidate.meta.get("hybrid_side", AGENT)] += 1


def _inject_into_generation(sampler: OptunaSearcher, number: int) -> None:
    """Optuna's CMA-ES learns only from trials it sampled in its current generation, and an enqueued
    trial's fixed values are never sampled; marking it as one of the generation's makes the agent's
    proposal a solution CMA-ES ranks and adapts to (CMA-ES's "injection" of external solutions).
    Until CMA-ES has sampled once (its start-up trials), there is no generation to join."""
    cma = sampler.study.sampler
    key = cma._attr_key_generation
    trials = sampler.study.get_trials(deepcopy=False)
    generation = max((t.system_attrs.get(key, -1) for t in trials), default=-1)
    if generation >= 0:
        target = next(t for t in trials if t.number == number)
        sampler.study._storage.set_trial_system_attr(target._trial_id, key, generation)


def cma_state(sampler: OptunaSearcher) -> str:
    """CMA-ES's search distribution, per knob: its mean and the range one sigma either side, in the
    knob's own units (log-scaled knobs are asymmetric). Read from Optuna's stored CMA object,
    which is private API: a change there shows up here as one line, not a failure."""
    try:
        from optuna._transform import _SearchSpaceTransform

        cma = sampler.study.sampler
        completed = cma._get_trials(sampler.study)
        optimizer = cma._restore_optimizer(completed)
        if optimizer is None:
            return "CMA-ES search distribution: not formed yet (its first generation is still being sampled)."
        space = cma.infer_relative_search_space(sampler.study, None)
        trans = _SearchSpaceTransform(space, transform_step=True, transform_0_1=True)
        mean = optimizer.mean
        sigmas = optimizer._sigma * (optimizer._C.diagonal() ** 0.5)
        centre = trans.untransform(mean)
        lines = [f"CMA-ES search distribution (generation {optimizer.generation}, sigma {optimizer._sigma:.3g}):"]
        for i, name in enumerate(space):
            lo, hi = mean.copy(), mean.copy()
            lo[i] = max(trans.bounds[i, 0], mean[i] - sigmas[i])
            hi[i] = min(trans.bounds[i, 1], mean[i] + sigmas[i])
            lines.append(f"- {name}: mean {sp.fmt(centre[name])}, 1-sigma range "
                         f"[{sp.fmt(trans.untransform(lo)[name])}, {sp.fmt(trans.untransform(hi)[name])}]")
        return "\n".join(lines)
    except Exception as e:  # noqa: BLE001 - the prompt loses a section, the study goes on
        return f"CMA-ES search distribution: unavailable ({type(e).__name__}: {e})."
