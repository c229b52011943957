"""The classical searchers against a synthetic objective: no training, the real train.py.

Each searcher is driven through ask/tell the way the study loop drives it: up to `slots` trials in
flight, results arriving in a seeded shuffled order, every trial round-tripped through JSON as
the journal stores it, so resume and replay see exactly what they would in a real study. The
objective is a known function of the knobs (a bowl in log learning rate), so where the optimum is
and what each searcher should find is computed, not hard-coded.
"""
from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState

from searchers.greedy import GreedySearcher
from searchers.grid import GridSearcher
from searchers.optuna_search import OptunaSearcher
from study.core import SearchContext
from study.records import Result, Trial
from study.space import validate_space
from train.knobs import read_knobs, write_knobs

ROOT = Path(__file__).resolve().parent.parent
BASELINE = (ROOT / "train" / "train.py").read_text()
KNOBS = read_knobs(BASELINE)

SPACE = {
    "MATRIX_LR": {"type": "float", "low": 0.004, "high": 0.2, "log": True, "levels": [0.01, 0.02, 0.04, 0.08, 0.16]},
    "EMBEDDING_LR": {"type": "float", "low": 0.05, "high": 2.0, "log": True, "levels": [0.15, 0.3, 0.6, 1.2]},
    "DEPTH": {"type": "int", "low": 2, "high": 12, "levels": [4, 6, 8, 10, 12]},
    "ADAM_BETAS": {"type": "categorical", "choices": [[0.8, 0.95], [0.9, 0.95], [0.9, 0.99]]},
}


def bowl(knobs: dict) -> float:
    """Minimum 1.0 at MATRIX_LR=0.02, EMBEDDING_LR=0.3, DEPTH=6, ADAM_BETAS=(0.9, 0.95)."""
    return (1.0 + math.log(knobs["MATRIX_LR"] / 0.02) ** 2 + 0.5 * math.log(knobs["EMBEDDING_LR"] / 0.3) ** 2
            + 0.01 * (knobs["DEPTH"] - 6) ** 2 + (0.0 if list(knobs["ADAM_BETAS"]) == [0.9, 0.95] else 0.05))


def diverges(knobs: dict) -> Result:
    """The bowl, except that every EMBEDDING_LR below 0.5 ends in NaN: the region around the
    bowl's floor fails, so a searcher that took a failure for a good score would settle there."""
    if knobs["EMBEDDING_LR"] < 0.5:
        return Result(status="nan", error="loss is nan at step 3")
    return Result(status="ok", val_bpb=bowl(knobs))


def ok(knobs: dict) -> Result:
    return Result(status="ok", val_bpb=bowl(knobs))


def make_ctx(tmp_path, space=SPACE, seed=0) -> SearchContext:
    return SearchContext(baseline_source=BASELINE, baseline_knobs=KNOBS, space=space, seed=seed,
                         study_dir=str(tmp_path), objective={"preset": "test"})


def journal_copy(trial: Trial) -> Trial:
    return Trial.from_dict(json.loads(json.dumps(trial.to_dict())))


class Driver:
    """The study loop in miniature: fill free slots with ask, finish a random in-flight trial,
    tell it. `journal` keeps (trial, result) in tell order, as the real journal does."""

    def __init__(self, searcher, ctx, objective=ok, slots=1, seed=0, setup=True):
        self.searcher, self.ctx, self.objective, self.slots = searcher, ctx, objective, slots
        if setup:
            searcher.setup(ctx)
        self.rng = random.Random(seed)
        self.journal: list[tuple[Trial, Result]] = []
        self.asked: list[Trial] = []
        self.asked_after: dict[str, int] = {}  # trial id -> how many results were told before its ask
        self.running: list[Trial] = []

    def run(self, max_trials: int) -> "Driver":
        while True:
            free = min(self.slots - len(self.running), max_trials - len(self.asked))
            if free > 0 and not self.searcher.done():
                self.ctx.history = list(self.journal)
                self.ctx.in_flight = list(self.running)
                for cand in self.searcher.ask(free, self.ctx):
                    trial = Trial(trial_id=f"t{len(self.asked):04d}", index=len(self.asked), candidate=cand,
                                  objective=self.ctx.objective)
                    self.asked.append(trial)
                    self.asked_after[trial.trial_id] = len(self.journal)
                    self.running.append(trial)
            if not self.running:
                return self
            trial = journal_copy(self.running.pop(self.rng.randrange(len(self.running))))
            result = self.objective(read_knobs(trial.candidate.source))  # what the harness would run
            self.journal.append((trial, result))
            self.searcher.tell(trial, result)

    def best(self) -> tuple[Trial, Result]:
        return min(((t, r) for t, r in self.journal if r.ok), key=lambda tr: tr[1].score())

    def configs(self) -> list[str]:
        return [json.dumps(t.candidate.knobs, sort_keys=True) for t in self.asked]


def tpe():
    return OptunaSearcher(name="tpe", sampler="tpe",
                          options={"multivariate": True, "constant_liar": True, "n_startup_trials": 8})


def in_space(knobs: dict, space=SPACE) -> bool:
    for name, v in knobs.items():
        spec = space[name]
        if spec["type"] == "categorical":
            if list(v) not in spec["choices"]:
                return False
        elif not spec["low"] <= v <= spec["high"]:
            return False
    return True


# -- every searcher --------------------------------------------------------------------------------

# random and gp go through the same class as tpe and cmaes; they have tests of their own below
# (gp fits a Gaussian process per ask, seconds each on a shared CPU).
SEARCHERS = {
    "tpe": tpe,
    "cmaes": lambda: OptunaSearcher(name="cmaes", sampler="cmaes", options={"warn_independent_sampling": False}),
    "grid": lambda: GridSearcher(levels={"EMBEDDING_LR": None, "MATRIX_LR": [0.01, 0.02, 0.04], "DEPTH": [6, 8]}),
    "greedy": GreedySearcher,
}


@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("name", list(SEARCHERS))
def test_candidates_are_runnable_train_py_with_their_knobs(tmp_path, name, slots):
    driver = Driver(SEARCHERS[name](), make_ctx(tmp_path), slots=slots).run(10)
    assert len(driver.asked) == 10
    assert len(set(driver.configs())) == 10 or isinstance(driver.searcher, OptunaSearcher)
    for trial in driver.asked:
        cand = trial.candidate
        written = read_knobs(cand.source)
        assert set(cand.knobs) <= set(SPACE)
        for knob, value in cand.knobs.items():
            assert json.dumps(written[knob]) == json.dumps(value)  # a tuple knob stays a tuple
        assert {k: v for k, v in written.items() if k not in cand.knobs} == {
            k: v for k, v in KNOBS.items() if k not in cand.knobs}
        assert in_space(cand.knobs)
        assert cand.hypothesis
        json.dumps(cand.to_dict())  # the journal can hold it


@pytest.mark.parametrize("name", list(SEARCHERS))
def test_same_seed_same_candidates(tmp_path, name):
    runs = [Driver(SEARCHERS[name](), make_ctx(tmp_path / str(i), seed=7), slots=3, seed=1).run(10).configs()
            for i in range(2)]
    assert runs[0] == runs[1]
    if name in ("tpe", "cmaes"):  # the seed is what makes them agree
        other = Driver(SEARCHERS[name](), make_ctx(tmp_path / "other", seed=8), slots=3, seed=1).run(10)
        assert other.configs() != runs[0]


def test_gp_proposes_valid_reproducible_candidates(tmp_path):
    def run(i):
        gp = OptunaSearcher(name="gp", sampler="gp", options={"n_startup_trials": 3})
        return Driver(gp, make_ctx(tmp_path / str(i), seed=5), slots=2, seed=2).run(6)

    first, second = run(0), run(1)
    assert first.configs() == second.configs()
    assert all(in_space(t.candidate.knobs) for t in first.asked)
    assert first.searcher.summary() == {"optuna_trials": 6, "optuna_failed": 0, "optuna_reused": 0}


@pytest.mark.parametrize("name", list(SEARCHERS))
def test_a_failure_is_never_the_best_and_the_search_goes_on(tmp_path, name):
    driver = Driver(SEARCHERS[name](), make_ctx(tmp_path), objective=diverges, slots=2).run(14)
    outcomes = [r.ok for _, r in driver.journal]
    assert False in outcomes, "the failing region was never tried"
    first_failure = outcomes.index(False)
    assert any(told > first_failure for told in driver.asked_after.values())  # it went on asking
    best_trial, _ = driver.best()
    assert read_knobs(best_trial.candidate.source)["EMBEDDING_LR"] >= 0.5
    if isinstance(driver.searcher, OptunaSearcher):
        states = {t.number: t.state for t in driver.searcher.study.get_trials()}
        for trial, result in driver.journal:
            expected = TrialState.COMPLETE if result.ok else TrialState.FAIL
            assert states[trial.candidate.meta["optuna_trial"]] == expected
        assert driver.searcher.study.best_trial.params["EMBEDDING_LR"] >= 0.5


# -- space validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("space, message", [
    ({"LEARNING_RATE": {"low": 0.1, "high": 1.0}}, "LEARNING_RATE is not a knob of train.py"),
    ({"DEPTH": {"type": "float", "low": 2.0, "high": 8.0}}, "type float does not match train.py's value 8"),
    ({"MATRIX_LR": {"type": "int", "low": 1, "high": 3}}, "type int does not match"),
    ({"HEAD_DIM": {"choices": [64, "128"]}}, "choice '128' (str) does not match"),
    ({"ADAM_BETAS": {"choices": [0.9]}}, "is not a sequence"),
    ({"MATRIX_LR": {"low": 0.1, "high": 0.01}}, "low 0.1 must be below high 0.01"),
    ({"MATRIX_LR": {"low": 0.1, "high": 0.1}}, "must be below"),
    ({"MATRIX_LR": {"low": 0.0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
    ({"MATRIX_LR": {"low": 0.01, "high": 0.1, "levels": []}}, "`levels` must be a non-empty list"),
    ({"MATRIX_LR": {"low": 0.01, "high": 0.1, "levels": [0.02, 0.5]}}, "levels [0.5] lie outside [0.01, 0.1]"),
    ({"DEPTH": {"low": 2, "high": 8, "levels": [2, 4.5]}}, "4.5 is not an int"),
    ({"DEPTH": {"low": 2, "high": 8, "levels": [4, 4]}}, "duplicate levels"),
    ({"MATRIX_LR": {"low": 0.01, "hgih": 0.1}}, "unknown key(s) hgih"),
    ({"MATRIX_LR": {"low": 0.01}}, "give both `low` and `high`"),
    ({"MATRIX_LR": {"log": True}}, "give `low` and `high`, or `levels`"),
    ({"MATRIX_LR": {"type": "loguniform", "low": 0.01, "high": 0.1}}, "type 'loguniform' is not one of"),
    ({"MATRIX_LR": 0.04}, "expected a spec mapping"),
    ({"HEAD_DIM": {"choices": []}}, "`choices` must be a non-empty list"),
    ({"HEAD_DIM": {"choices": [64, 128], "levels": [256]}}, "levels [256] are not among the choices"),
    ({"HEAD_DIM": {"choices": [64, 128], "low": 1}}, "a categorical knob takes `choices`"),
    ({"DEPTH": {"low": 2, "high": 8, "step": 0}}, "step must be positive"),
    ({}, "expected a non-empty mapping"),
])
def test_bad_space_is_one_clear_line(space, message):
    with pytest.raises(ValueError) as e:
        validate_space(space, KNOBS)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_space_is_normalised_from_hydra_config():
    raw = OmegaConf.create({
        "MATRIX_LR": {"low": 0.01, "high": 0.1, "log": True, "levels": [0.04, 0.02]},
        "WARMUP_RATIO": {"levels": [0, 0.1]},
        "DEPTH": {"low": 2, "high": 6},
        "ADAM_BETAS": {"choices": [[0.8, 0.95], [0.9, 0.95]]},
    })
    space = validate_space(raw, KNOBS)
    assert space["MATRIX_LR"] == {"type": "float", "low": 0.01, "high": 0.1, "log": True, "levels": [0.02, 0.04]}
    assert space["WARMUP_RATIO"] == {"type": "float", "low": 0.0, "high": 0.1, "log": False, "levels": [0.0, 0.1]}
    assert isinstance(space["WARMUP_RATIO"]["levels"][0], float)
    assert space["DEPTH"]["type"] == "int"
    assert space["ADAM_BETAS"]["choices"] == [[0.8, 0.95], [0.9, 0.95]]
    assert validate_space(space, KNOBS) == space  # the searchers re-validate what run.py validated
    json.dumps(space)


def preset_baseline(preset: str) -> str:
    knobs = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / f"{preset}.yaml"))["knobs"]
    return write_knobs(BASELINE, knobs) if knobs else BASELINE


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_conf_spaces_fit_their_preset(preset):
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "space" / f"{preset}.yaml"))
    space = validate_space(raw, read_knobs(preset_baseline(preset)))
    assert all(spec["levels"] for spec in space.values())  # grid and greedy can walk every knob


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "grid", "greedy"])
def test_searcher_configs_build_and_propose(tmp_path, name):
    """conf/searcher/NAME.yaml as run.py builds it, over the default space and preset."""
    searcher = instantiate(OmegaConf.load(ROOT / "conf" / "searcher" / f"{name}.yaml"), _convert_="all")
    source = preset_baseline("cpu")
    raw = OmegaConf.load(ROOT / "conf" / "space" / "cpu.yaml")
    ctx = SearchContext(baseline_source=source, baseline_knobs=read_knobs(source), space=raw, seed=0,
                        study_dir=str(tmp_path), objective={})
    searcher.setup(ctx)
    assert searcher.name == name
    candidates = searcher.ask(2, ctx)
    assert len(candidates) == 2 and len({json.dumps(c.knobs, sort_keys=True) for c in candidates}) == 2


# -- Optuna -----------------------------------------------------------------------------------------

def test_optuna_trial_zero_is_the_baseline(tmp_path):
    driver = Driver(tpe(), make_ctx(tmp_path)).run(2)
    first = driver.asked[0].candidate
    assert first.meta["optuna_trial"] == 0
    assert first.knobs == {k: list(KNOBS[k]) if isinstance(KNOBS[k], tuple) else KNOBS[k] for k in SPACE}
    assert first.source == BASELINE  # writing the baseline's own values changes nothing
    assert "baseline values" in first.hypothesis


def test_tpe_beats_random_and_finds_the_bowl(tmp_path):
    """Over three seeds with four trials in flight (constant liar), TPE's best is lower on average
    than random search's, and every TPE run ends inside the bowl's floor."""
    bests = {"tpe": [], "random": []}
    for seed in range(3):
        for name, make in (("tpe", tpe), ("random", lambda: OptunaSearcher(name="random", sampler="random"))):
            ctx = make_ctx(tmp_path / f"{name}{seed}", seed=seed)
            bests[name].append(Driver(make(), ctx, slots=4, seed=seed).run(40).best()[1].val_bpb)
    assert sum(bests["tpe"]) < sum(bests["random"]), bests
    assert max(bests["tpe"]) < 1.0 + 0.15, bests


def test_optuna_bad_config_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="unknown optuna sampler 'hyperband'"):
        OptunaSearcher(sampler="hyperband")
    with pytest.raises(ValueError, match="bad options for optuna tpe"):
        OptunaSearcher(options={"n_startup": 3}).setup(make_ctx(tmp_path))


def test_optuna_resume_replays_idempotently_and_reuses_orphans(tmp_path):
    """Kill the orchestrator with two trials asked but unfinished: one the loop re-runs (it is in
    ctx.in_flight after the restart), one that never reached the journal. The resumed searcher
    ignores the tells optuna.db already holds, hands out the orphan's parameters again, and
    never re-proposes the trial being re-run."""
    first = Driver(tpe(), make_ctx(tmp_path, seed=3), slots=2).run(10)
    rerun, orphan = first.searcher.ask(2, first.ctx)
    rerun_trial = journal_copy(Trial(trial_id="t0010", index=10, candidate=rerun, objective={}))

    resumed = tpe()
    ctx = make_ctx(tmp_path, seed=3)
    resumed.setup(ctx)
    for _ in range(2):  # a second restart replays the same journal again
        for trial, result in first.journal:
            resumed.tell(trial, result)
    states = [t.state for t in resumed.study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 10 and states.count(TrialState.RUNNING) == 2

    ctx.in_flight = [rerun_trial]
    again, *fresh = resumed.ask(3, ctx)
    assert again.meta == {**orphan.meta, "reused": True} and again.knobs == orphan.knobs
    told = {t.candidate.meta["optuna_trial"] for t, _ in first.journal}
    assert all(c.meta["optuna_trial"] > orphan.meta["optuna_trial"] for c in fresh)
    assert not told & {c.meta["optuna_trial"] for c in fresh}

    for i, cand in enumerate([again, *fresh], start=11):
        resumed.tell(journal_copy(Trial(trial_id=f"t{i:04d}", index=i, candidate=cand, objective={})), ok(cand.knobs))
    resumed.tell(rerun_trial, ok(rerun.knobs))
    trials = resumed.study.get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 14 == len(trials)
    assert resumed.summary()["optuna_reused"] == 1


def test_optuna_rebuilds_a_lost_storage_from_the_journal(tmp_path):
    first = Driver(tpe(), make_ctx(tmp_path), objective=diverges, slots=3).run(12)
    (tmp_path / "optuna.db").unlink()
    resumed = tpe()
    ctx = make_ctx(tmp_path)
    resumed.setup(ctx)
    for _ in range(2):
        for trial, result in first.journal:
            resumed.tell(trial, result)
    trials = resumed.study.get_trials()
    assert sorted(t.user_attrs["arena_trial_id"] for t in trials) == sorted(t.trial_id for t, _ in first.journal)
    failed = {t.trial_id for t, r in first.journal if not r.ok}
    assert {t.user_attrs["arena_trial_id"] for t in trials if t.state == TrialState.FAIL} == failed
    (next_cand,) = resumed.ask(1, ctx)
    assert next_cand.meta["optuna_trial"] == 12  # sampled anew, not the baseline again


# -- grid -------------------------------------------------------------------------------------------

def test_grid_is_the_exact_factorial_in_declared_order(tmp_path):
    grid = GridSearcher(levels={"MATRIX_LR": None, "DEPTH": [4, 8], "ADAM_BETAS": None})
    driver = Driver(grid, make_ctx(tmp_path), slots=4).run(1000)
    expected = [{"MATRIX_LR": lr, "DEPTH": d, "ADAM_BETAS": b}
                for lr, d, b in itertools.product(SPACE["MATRIX_LR"]["levels"], [4, 8], SPACE["ADAM_BETAS"]["choices"])]
    assert [t.candidate.knobs for t in driver.asked] == expected
    assert grid.done() and grid.ask(4, driver.ctx) == []
    assert driver.asked[1].candidate.hypothesis.startswith("grid 2/30: MATRIX_LR=0.01, DEPTH=4, ADAM_BETAS=")


def test_grid_defaults_to_the_space_and_refuses_a_huge_grid(tmp_path):
    with pytest.raises(ValueError, match=r"grid has 300 cells \(MATRIX_LR 5 x EMBEDDING_LR 4 x DEPTH 5 x "
                                         r"ADAM_BETAS 3\), more than max_grid=256"):
        GridSearcher().setup(make_ctx(tmp_path))
    with pytest.raises(ValueError, match="levels: knob WARMDOWN_RATIO: give `low` and `high`, or `levels`"):
        GridSearcher(levels={"WARMDOWN_RATIO": None}).setup(make_ctx(tmp_path))
    grid = GridSearcher(max_grid=300)
    grid.setup(make_ctx(tmp_path))
    assert len(grid.cells) == 300


def test_grid_resume_skips_told_and_running_cells(tmp_path):
    levels = {"MATRIX_LR": None, "DEPTH": [4, 8]}
    first = Driver(GridSearcher(levels=levels), make_ctx(tmp_path), objective=diverges, slots=2).run(4)
    in_flight, lost = first.searcher.ask(2, first.ctx)  # the orchestrator dies here
    resumed = GridSearcher(levels=levels)
    ctx = make_ctx(tmp_path)
    resumed.setup(ctx)
    for trial, result in first.journal:
        resumed.tell(trial, result)
    ctx.in_flight = [Trial(trial_id="t0004", index=4, candidate=in_flight, objective={})]
    rest = resumed.ask(100, ctx)
    seen = [t.candidate.knobs for t, _ in first.journal] + [in_flight.knobs]
    assert rest[0].knobs == lost.knobs
    assert len(seen) + len(rest) == 10 and not any(c.knobs in seen for c in rest)
    assert resumed.done()


# -- greedy -----------------------------------------------------------------------------------------

def neighbours(knobs: dict, space=SPACE) -> list[dict]:
    out = []
    for name, spec in validate_space(space, KNOBS).items():
        levels = spec["levels"]
        i = [json.dumps(v) for v in levels].index(json.dumps(knobs[name]))
        out += [{**knobs, name: levels[j]} for j in (i - 1, i + 1) if 0 <= j < len(levels)]
    return out


@pytest.mark.parametrize("slots", [1, 4])
def test_greedy_climbs_one_knob_at_a_time_to_the_optimum(tmp_path, slots):
    space = SPACE
    driver = Driver(GreedySearcher(), make_ctx(tmp_path, space), slots=slots, seed=slots).run(1000)
    by_id = {t.trial_id: t for t, _ in driver.journal}
    assert driver.asked[0].candidate.knobs == {k: json.loads(json.dumps(KNOBS[k])) for k in space}
    for trial in driver.asked[1:]:
        parent = trial.candidate.parent
        assert parent is None or parent in by_id
        origin = by_id[parent].candidate.knobs if parent else driver.asked[0].candidate.knobs
        assert trial.candidate.knobs in [json.loads(json.dumps(n)) for n in neighbours(origin, space)]
    assert len(set(driver.configs())) == len(driver.asked)  # nothing ran twice
    assert driver.searcher.done()
    # The bowl is separable and convex along each knob, so the local optimum is the grid's best.
    levels = [spec["levels"] for spec in validate_space(space, KNOBS).values()]
    cells = [dict(zip(space, values)) for values in itertools.product(*levels)]
    best_cell = min(cells, key=bowl)
    assert driver.best()[0].candidate.knobs == json.loads(json.dumps(best_cell))
    tried = {json.dumps(t.candidate.knobs, sort_keys=True) for t in driver.asked}
    assert all(json.dumps(n, sort_keys=True) in tried for n in json.loads(json.dumps(neighbours(best_cell, space))))
    if slots == 1:  # each step starts from the best result so far
        for trial in driver.asked[1:]:
            told = driver.journal[:driver.asked_after[trial.trial_id]]
            assert trial.candidate.parent == min(told, key=lambda tr: tr[1].score())[0].trial_id
        assert len(driver.asked) < len(cells) / 5  # a climb, not a sweep


def test_greedy_keeps_only_real_improvements(tmp_path):
    """With min_improvement above every possible gain it never leaves the baseline: it tries each
    neighbour once and stops."""
    space = SPACE
    driver = Driver(GreedySearcher(min_improvement=100.0), make_ctx(tmp_path, space)).run(1000)
    baseline = driver.asked[0].candidate.knobs
    assert len(driver.asked) == 1 + len(neighbours(baseline, space))
    assert all(t.candidate.parent == "t0000" for t in driver.asked[1:])
    assert "greedy: MATRIX_LR 0.04->0.02 from t0000" == driver.asked[1].candidate.hypothesis


def test_greedy_steps_around_crashes(tmp_path):
    driver = Driver(GreedySearcher(), make_ctx(tmp_path), objective=diverges).run(1000)
    crashed = [t for t, r in driver.journal if not r.ok]
    assert crashed  # it did step into the failing region
    assert all(t.trial_id not in {x.candidate.parent for x in driver.asked} for t in crashed)
    assert driver.searcher.done()


def test_greedy_resume_continues_the_same_climb(tmp_path):
    space = SPACE
    straight = Driver(GreedySearcher(), make_ctx(tmp_path / "a", space)).run(14)
    half = Driver(GreedySearcher(), make_ctx(tmp_path / "b", space)).run(7)
    resumed = GreedySearcher()
    ctx = make_ctx(tmp_path / "b", space)
    resumed.setup(ctx)
    for trial, result in half.journal:
        resumed.tell(trial, result)
    rest = Driver(resumed, ctx, setup=False)
    rest.journal, rest.asked = list(half.journal), list(half.asked)
    rest.run(14)
    assert rest.configs() == straight.configs()


def test_greedy_needs_levels_it_can_walk(tmp_path):
    with pytest.raises(ValueError, match="knob MATRIX_LR has no levels"):
        GreedySearcher().setup(make_ctx(tmp_path, {"MATRIX_LR": {"low": 0.01, "high": 0.1}}))
    with pytest.raises(ValueError, match=r"baseline value \(0.8, 0.95\) of ADAM_BETAS is not among its levels"):
        GreedySearcher().setup(make_ctx(tmp_path, {"ADAM_BETAS": {"choices": [[0.9, 0.95], [0.9, 0.99]]}}))
