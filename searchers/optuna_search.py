"""Optuna's samplers (TPE, random, CMA-ES, GP) behind the arena's ask/tell, one class for all.

Optuna already does the sampling, the parallel-trial bookkeeping (TPE's constant liar) and the
persistence (an RDB study in the study directory), so this file only translates: a space spec
into Optuna distributions, an Optuna trial into a candidate, a result into a COMPLETE or FAIL.

Resume: the study loop replays `tell` from its journal into a searcher whose Optuna study was
loaded from `optuna.db`, so `tell` skips trials the storage already finished, and adds to the
storage any journal trial it does not hold (a lost or replaced optuna.db), keyed by the arena
trial id. Optuna trials left RUNNING by a killed orchestrator that the loop is not re-running
(not in `ctx.in_flight` at the first ask) are *reused*: handed out again, with the parameters
already sampled for them, before anything new is sampled, so the sampler is never left waiting
on trials that will not finish and no sample is wasted.

A sampler is rebuilt on every start, and rebuilt with the study's seed its random stream would
start over: a resumed random or TPE study would propose its first candidates again. So the sampler's
random streams are saved around every Optuna ask (`SamplerCheckpoint`) and restored on start: a
resumed study draws exactly what the uninterrupted one would have. A kill can land inside an ask,
leaving a half-made Optuna trial (some parameters written) or a whole one whose streams were never
saved; such trials, made after the last checkpoint and never handed to the loop, are taken out of
the storage on start and the ask is made again from the checkpoint, so it proposes the same
candidate. (Marking them FAIL, as before, shifted every later trial number, which CMA-ES seeds
from, and left the streams to be reseeded.) Where exactness cannot hold, the start says so in one
line: GP's kernel fit warm-starts from the last one in memory, and a study whose streams were lost
(no checkpoint, optuna.db replaced) continues from fresh streams.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from searchers import space as sp
from study.core import SearchContext, Searcher
from study.records import Candidate, Result, Trial

log = logging.getLogger("arena")

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
}
LABELS = {"tpe": "TPE", "random": "random", "cmaes": "CMA-ES", "gp": "GP"}
# Optuna's own categorical choices must be None/bool/int/float/str; a tuple knob (ADAM_BETAS)
# travels as its JSON text.
PRIMITIVES = (type(None), bool, int, float, str)


class OptunaSearcher(Searcher):
    """`sampler` picks the Optuna sampler; `options` are that sampler's own keyword arguments
    (e.g. tpe: multivariate, constant_liar, n_startup_trials), passed through unchanged so the
    Optuna docs are the reference. `enqueue_baseline` makes trial 0 the baseline's values."""

    def __init__(self, name: str = "tpe", sampler: str = "tpe", options: dict | None = None,
                 enqueue_baseline: bool = True, storage_file: str = "optuna.db"):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown optuna sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.name = name
        self.sampler_name = sampler
        self.options = sp.plain(options or {})
        self.enqueue_baseline = enqueue_baseline
        self.storage_file = storage_file
        self.reused: list[int] = []  # Optuna trial numbers handed out again after a resume

    def random_start(self) -> int | None:
        """`options.n_startup_trials`, else the sampler's own default (None for a sampler without one)."""
        param = inspect.signature(SAMPLERS[self.sampler_name]).parameters.get("n_startup_trials")
        return None if param is None else self.options.get("n_startup_trials", param.default)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.space = sp.validate_space(ctx.space, ctx.baseline_knobs)
        self.distributions = {k: _distribution(spec) for k, spec in self.space.items()}
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the study loop reports progress
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            sampler = SAMPLERS[self.sampler_name](seed=ctx.seed, **self.options)
        except TypeError as e:
            raise ValueError(f"bad options for optuna {self.sampler_name}: {e}") from None
        os.makedirs(ctx.study_dir, exist_ok=True)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{os.path.abspath(os.path.join(ctx.study_dir, self.storage_file))}")
        # No fsync per commit (Optuna commits every parameter): several times faster on a busy or
        # network disk. A killed process still leaves a consistent file; after an OS crash that
        # damaged it, delete optuna.db: the journal's replay rebuilds it (see `tell`).
        sqlalchemy.event.listen(storage.engine, "connect", _no_fsync)
        storage.engine.dispose()  # reconnect with the setting
        stem = os.path.splitext(self.storage_file)[0]
        self.checkpoint = SamplerCheckpoint(os.path.join(ctx.study_dir, f"{stem}.{self.name}.sampler.json"))
        undone = self.checkpoint.undo_unfinished_ask(storage, self.name)  # before Optuna caches the trials
        self.study = optuna.create_study(storage=storage, study_name=self.name, sampler=sampler,
                                         direction="minimize", load_if_exists=True)
        n_trials = len(self.study.get_trials(deepcopy=False))
        how = self.checkpoint.restore(sampler, n_trials, ctx.seed)
        if undone:
            log.info("optuna %s: %d trial(s) a kill left half-asked were taken out; the ask is made again",
                     self.name, undone)
        if how == "reseeded":
            log.warning("optuna %s: the sampler's saved random state does not match optuna.db (lost, or from an "
                        "older version); it continues from fresh streams, so this resumed study proposes "
                        "other candidates than an uninterrupted one would", self.name)
        elif n_trials and self.sampler_name == "gp":
            log.warning("optuna gp: the GP's kernel fit restarts from its default on resume (its warm start is "
                        "not saved), so proposals may differ from an uninterrupted study's")
        self._orphans: list[FrozenTrial] | None = None  # found at the first ask, after the replay

    def ask(self, n: int, ctx: SearchContext) -> list[Candidate]:
        self._adopt_orphans(ctx)
        out = []
        for _ in range(n):
            meta = {"optuna_study": self.name}
            if self._orphans:
                frozen = self._orphans.pop(0)
                number, params = frozen.number, frozen.params
                self.reused.append(number)
                meta["reused"] = True
            else:
                # Saved before and after: a kill in between leaves trials past the saved count, or
                # an enqueued one popped from the queue, which the next start takes back before
                # asking again from the saved streams.
                self.checkpoint.save(self.study.sampler, self.study.get_trials(deepcopy=False))
                trial = self.study.ask(fixed_distributions=self.distributions)
                number, params = trial.number, trial.params
                self.checkpoint.save(self.study.sampler, self.study.get_trials(deepcopy=False))
            meta["optuna_trial"] = number
            values = {k: sp.significant(_external(self.space[k], params[k])) for k in self.space}
            hypothesis = f"{LABELS[self.sampler_name]} #{number}: {sp.describe(values, ctx.baseline_knobs)}"
            out.append(sp.candidate(ctx, values, hypothesis, meta=meta))
        return out

    def enqueue_knobs(self, knobs: dict[str, Any], ctx: SearchContext) -> Candidate | None:
        """Knob values proposed by someone else (the hybrid's agent) as this sampler's next trial,
        so the sampler learns from its result like from its own. None when the values are outside
        the space, or when trials a killed run left open must be handed out first."""
        self._adopt_orphans(ctx)
        params = self._params(knobs)
        if params is None or self._orphans:
            return None
        self.study.enqueue_trial(params, skip_if_exists=False)
        return self.ask(1, ctx)[0]

    def _adopt_orphans(self, ctx: SearchContext) -> None:
        """Once, after the replay: trials a killed run asked for but never ran are handed out again."""
        if self._orphans is not None:
            return
        if self.enqueue_baseline and not self.study.get_trials(deepcopy=False):
            self._enqueue_baseline()  # a fresh study: not after a replay rebuilt the storage
        running = {t.candidate.meta.get("optuna_trial") for t in ctx.in_flight}
        pending = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self._orphans = [t for t in pending if t.number not in running]
        for t in [t for t in self._orphans if set(t.params) != set(self.distributions)]:
            self.study.tell(t.number, state=TrialState.FAIL)  # from another space (a kill mid-ask is undone)
            self._orphans.remove(t)

    def tell(self, trial: Trial, result: Result) -> None:
        """Failures are FAIL, never a value, so no sampler can mistake a crash for a good run."""
        params = self._params(trial.candidate.knobs)
        if params is None:
            return  # not a candidate over this space: nothing the sampler can learn from
        state = TrialState.COMPLETE if result.ok else TrialState.FAIL
        value = result.score() if result.ok else None
        trials = self.study.get_trials(deepcopy=False)
        number = trial.candidate.meta.get("optuna_trial")
        stored = next((t for t in trials if t.number == number), None)
        if stored is not None and {k: sp.significant(v) for k, v in stored.params.items()} == params:
            self.study.tell(number, value, state=state, skip_if_finished=True)
        elif not any(t.user_attrs.get("arena_trial_id") == trial.trial_id for t in trials):
            # The storage never saw this journal trial (optuna.db lost or replaced): rebuild it.
            self.study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self.distributions, value=value, state=state,
                user_attrs={"arena_trial_id": trial.trial_id}))

    def summary(self) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        return {
            "optuna_trials": len(trials),
            "optuna_failed": sum(t.state == TrialState.FAIL for t in trials),
            "optuna_reused": len(self.reused),
        }

    def _enqueue_baseline(self) -> None:
        """Only the baseline values inside the space are fixed; the others are sampled (Optuna
        refuses a categorical value outside its choices and would warn on an out-of-range one)."""
        params = {}
        for name, dist in self.distributions.items():
            value = _internal(self.space[name], self.ctx.baseline_knobs[name])
            if _inside(dist, value):
                params[name] = value
        outside = sorted(set(self.distributions) - set(params))
        if outside:
            logging.getLogger(__name__).warning(
                "baseline values of %s lie outside the space; trial 0 samples them", ", ".join(outside))
        self.study.enqueue_trial(params)

    def _params(self, knobs: dict[str, Any]) -> dict[str, Any] | None:
        if any(k not in knobs for k in self.distributions):
            return None
        params = {k: _internal(self.space[k], knobs[k]) for k in self.distributions}
        if not all(_inside(d, params[k]) for k, d in self.distributions.items()):
            return None
        return params


class SamplerCheckpoint:
    """An Optuna sampler's random streams, saved in the study folder before and after each Optuna
    ask so that a sampler rebuilt on resume continues them instead of replaying them from the seed.

    Any sampler works (TPE, random, CMA-ES, GP, or one inside a hybrid searcher): its streams are
    found by walking its attributes. The state is JSON, not a pickled sampler, because the study
    folder is also where untrusted candidates run. The checkpoint records how many Optuna trials
    existed when it was taken. More trials in the storage on resume are a kill inside an ask
    (`undo_unfinished_ask` takes them out); fewer, or no checkpoint (a study from before
    checkpoints, a lost file, a replaced optuna.db), and the streams are reseeded from (seed, trial
    count): a fresh stream, never a replay of the first one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def restore(self, sampler: optuna.samplers.BaseSampler, n_trials: int, seed: int | None) -> str:
        """Put `sampler` where the study left it; returns how: 'fresh', 'restored' or 'reseeded'."""
        streams = random_streams(sampler)
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            saved = None
        if saved and saved.get("n_trials") == n_trials and set(saved.get("streams", {})) == set(streams):
            for name, rng in streams.items():
                kind, keys, pos, has_gauss, gauss = saved["streams"][name]
                rng.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
            return "restored"
        if n_trials == 0:
            return "fresh"
        for i, name in enumerate(sorted(streams)):
            streams[name].seed([0 if seed is None else seed, n_trials, i])
        return "reseeded"

    def undo_unfinished_ask(self, storage: optuna.storages.RDBStorage, study_name: str) -> int:
        """Take back what a kill inside an ask left in `storage`: trials numbered at or past the
        checkpoint's count are deleted, and an enqueued trial (the baseline, an agent's knobs) that
        was waiting then and has been popped since is put back in the queue, its parameters gone.
        None of them was handed to the loop (a candidate leaves `ask` only after the save that
        counts it), so the redone ask, from the same streams, makes them again exactly. Only
        unfinished trials are touched; a finished one past the count means the checkpoint is not
        this storage's, and nothing is (restore then reseeds). Returns how many were taken back."""
        try:
            saved = json.loads(self.path.read_text())
            count, waiting = saved["n_trials"], set(saved.get("waiting", ()))
            study_id = storage.get_study_id_from_name(study_name)
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        trials = storage.get_all_trials(study_id, deepcopy=False)
        extra = [t for t in trials if t.number >= count]
        popped = [t for t in trials if t.number in waiting and t.number < count and t.state == TrialState.RUNNING]
        if any(t.state not in (TrialState.RUNNING, TrialState.WAITING) for t in extra) or not extra + popped:
            return 0

        def ids(found):
            return {"ids": [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in found]}

        def where(sql):
            return sqlalchemy.text(sql).bindparams(sqlalchemy.bindparam("ids", expanding=True))

        with storage.engine.begin() as db:  # Optuna has no delete or un-pop: its own tables, children first
            if extra:
                for table in _TRIAL_TABLES:
                    db.execute(where(f"DELETE FROM {table} WHERE trial_id IN :ids"), ids(extra))
            if popped:
                db.execute(where("DELETE FROM trial_params WHERE trial_id IN :ids"), ids(popped))
                db.execute(where("DELETE FROM trial_system_attributes WHERE trial_id IN :ids "
                                 "AND key != 'fixed_params'"), ids(popped))  # the enqueued values stay
                db.execute(where("UPDATE trials SET state = 'WAITING', datetime_start = NULL "
                                 "WHERE trial_id IN :ids"), ids(popped))
        return len(extra) + len(popped)

    def save(self, sampler: optuna.samplers.BaseSampler, trials: list[FrozenTrial]) -> None:
        """The streams, with how many trials the storage holds and which of them wait in its queue."""
        state = {name: [kind, keys.tolist(), pos, has_gauss, gauss]
                 for name, (kind, keys, pos, has_gauss, gauss) in
                 ((name, rng.get_state()) for name, rng in random_streams(sampler).items())}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"n_trials": len(trials), "streams": state,
                                   "waiting": [t.number for t in trials if t.state == TrialState.WAITING]}))
        os.replace(tmp, self.path)


# Optuna's RDB tables that hold a trial (optuna/storages/_rdb/models.py), the trial itself last.
_TRIAL_TABLES = ("trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
                 "trial_system_attributes", "trial_heartbeats", "trials")


def random_streams(sampler: Any, prefix: str = "", depth: int = 3) -> dict[str, np.random.RandomState]:
    """Every numpy RandomState a sampler draws from, by attribute path (TPE: `_rng` and its
    `_random_sampler._rng`)."""
    found = {}
    for name, value in sorted(vars(sampler).items()):
        if isinstance(value, optuna.samplers._lazy_random_state.LazyRandomState):
            found[prefix + name] = value.rng
        elif isinstance(value, np.random.RandomState):
            found[prefix + name] = value
        elif isinstance(value, optuna.samplers.BaseSampler) and depth > 1:
            found.update(random_streams(value, f"{prefix}{name}.", depth - 1))
    return found


def _no_fsync(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=OFF")


def _distribution(spec: dict[str, Any]):
    if spec["type"] == "categorical":
        return CategoricalDistribution([_internal(spec, c) for c in spec["choices"]])
    cls = IntDistribution if spec["type"] == "int" else FloatDistribution
    step = {"step": spec["step"]} if "step" in spec else {}
    return cls(spec["low"], spec["high"], log=spec["log"], **step)


def _internal(spec: dict[str, Any], value: Any) -> Any:
    """A knob value as Optuna stores it (a sequence becomes its JSON text)."""
    if spec["type"] == "categorical" and not isinstance(value, PRIMITIVES):
        return json.dumps(list(value))
    return value


def _external(spec: dict[str, Any], value: Any) -> Any:
    if spec["type"] == "categorical":
        for choice in spec["choices"]:
            if _internal(spec, choice) == value:
                return choice
    return value


def _inside(dist, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False
