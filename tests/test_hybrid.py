"""searcher=hybrid: an Optuna sampler and the Claude agent (through the real `anthropic` SDK against
the scripted Messages API of tests/fake_anthropic.py) in one study loop, on a synthetic objective
whose score is a known function of the train.py a trial runs."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from searchers.claude import ClaudeSearcher
from searchers import claude_board
from searchers.hybrid import AGENT, CARRIED, OVERHEAD, SAMPLER, HybridSearcher
from study.core import Launcher, SearchContext, Slot
from study.journal import Journal, JournalState
from study.loop import StopRules, StudyLoop
from study.records import Candidate, Result, Trial
from tests import fake_anthropic
from tests.fake_anthropic import EDITOR, FakeMessagesAPI, KnobAgent, state_text, tool_use, wave_number
from train.knobs import read_knobs, write_knobs

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ant-api03-arenaTEST-hybrid-0123456789abcdefghijklmnopqrstuvwxyz"
CONF = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "searcher" / "claude.yaml")),
        "study_max_trials": None, "study_max_hours": None}
HYBRID = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "searcher" / "hybrid.yaml"))
TINY_KNOBS = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml"))["knobs"]
BASELINE = write_knobs((ROOT / "train" / "train.py").read_text(), TINY_KNOBS)
SPACE = {"MATRIX_LR": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
         "EMBEDDING_LR": {"type": "float", "low": 0.05, "high": 3.0, "log": True}}
OBJECTIVE = {"budget_kind": "steps", "budget": 8, "hard_limit_s": 60, "warmup_steps": 1, "corpus": "austen",
             "vocab_size": 512}
CODE_EDIT = "_hybrid_code_edit = True  # a code change, not a knob\n"
strict_fake = fake_anthropic.strict_fake  # the shared strictness fixture (autouse): no request the API refuses


def synthetic_val_bpb(source: str) -> float:
    """Best at MATRIX_LR 0.03, EMBEDDING_LR 0.5; the agent's code edit is worth 0.2 anywhere."""
    knobs = read_knobs(source)
    bowl = math.log10(knobs["MATRIX_LR"] / 0.03) ** 2 + math.log10(knobs["EMBEDDING_LR"] / 0.5) ** 2
    return 2.0 + bowl - (0.2 if "_hybrid_code_edit" in source else 0.0)


class SyntheticLauncher(Launcher):
    name = "synthetic"

    def __init__(self, n_slots: int, seconds: float = 0.002):
        self._slots = [Slot(name=f"s{i}") for i in range(n_slots)]
        self.seconds = seconds
        self.running: dict[str, tuple[float, Trial]] = {}

    def slots(self):
        return self._slots

    def submit(self, trial, slot):
        self.running[trial.trial_id] = (time.time() + self.seconds * (1 + trial.index % 3), trial)

    def wait(self, timeout):
        deadline = time.time() + timeout
        while not (done := [t for t, (end, _) in self.running.items() if end <= time.time()]):
            if time.time() >= deadline:
                return []
            time.sleep(0.001)
        return [(t, Result(status="ok", val_bpb=synthetic_val_bpb(self.running.pop(t)[1].candidate.source)))
                for t in done]

    def cancel(self, trial_id):
        if trial_id in self.running:
            self.running[trial_id] = (0.0, self.running[trial_id][1])


class EditingAgent(KnobAgent):
    """Scales MATRIX_LR in every candidate (knob proposals); in wave `edit_wave` its c1 also gets a
    line of new code (a code edit)."""

    def __init__(self, edit_wave: int | None = 2):
        super().__init__("MATRIX_LR", [0.8, 1.2, 0.9, 1.1])
        self.edit_wave = edit_wave

    def edit(self, body):
        status, message, headers = super().edit(body)
        if wave_number(body) == self.edit_wave:
            message["content"].append(tool_use(EDITOR, {"command": "insert", "path": "c1/train.py",
                                                        "insert_line": 0, "insert_text": CODE_EDIT}))
        return status, message, headers


def build(api: FakeMessagesAPI, sampler: str = "cmaes", share: float = 0.7, background: bool = False) -> HybridSearcher:
    agent_conf = {k: v for k, v in CONF.items() if k != "_target_"}
    agent_conf.update(name="hybrid-agent", max_retries=0, wave_backoff_s=0, background=False)
    agent = ClaudeSearcher(**agent_conf, http_client=api.client())
    return HybridSearcher(agent=agent, sampler=sampler, share=share, background=background,
                          sampler_options=HYBRID["sampler_options"] if sampler == "cmaes" else {"n_startup_trials": 4})


def make_loop(study_dir: Path, searcher, n_slots: int, max_trials: int) -> StudyLoop:
    ctx = SearchContext(baseline_source=BASELINE, baseline_knobs=read_knobs(BASELINE), space=SPACE, seed=0,
                        study_dir=str(study_dir), objective=OBJECTIVE, device_kinds={"cpu": {"count": n_slots}})
    return StudyLoop(searcher=searcher, launcher=SyntheticLauncher(n_slots), ctx=ctx, objective=OBJECTIVE,
                     study_dir=study_dir, seed=0, rules=StopRules(max_trials=max_trials))


def run_hybrid(study_dir: str, max_trials: int, edit_wave: int | None = 2, sampler: str = "cmaes"):
    """One hybrid study; the kill -9 test runs this in a process of its own."""
    os.environ["ANTHROPIC_API_KEY"] = KEY
    api = FakeMessagesAPI(policy=EditingAgent(edit_wave))
    searcher = build(api, sampler=sampler)
    state = make_loop(Path(study_dir), searcher, 4, max_trials).run({"study_id": "hybrid"})
    return searcher, api, state


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def sides(journal: Path) -> Counter:
    """Each side's proposals (the baseline's seeds, confirmations and re-runs are evidence, not ideas)."""
    return Counter(t.candidate.meta["hybrid_side"] for t in JournalState.load(journal).trials.values()
                   if t.candidate.meta.get("role") not in OVERHEAD)


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_the_sampler_proposes_its_share_and_both_sides_hear_every_result(tmp_path, sampler):
    # 40 trials: the agent's 30% also carries the baseline seeds and the keep rule's confirmations,
    # and at 20 a slow machine could spend all six agent-side trials on those (seen once in CI)
    searcher, api, state = run_hybrid(str(tmp_path), 40, edit_wave=None, sampler=sampler)
    split = sides(tmp_path / "journal.jsonl")
    proposals = split[SAMPLER] + split[AGENT]
    assert abs(split[SAMPLER] - 0.7 * proposals) <= 1, split
    summary = searcher.summary()
    assert summary["hybrid_sampler_trials"] == split[SAMPLER] and summary["hybrid_agent_trials"] == split[AGENT]
    assert summary["hybrid_overhead_trials"] == 40 - proposals >= 3, "the baseline's three seeds at least"

    history = state.history
    assert set(searcher.agent.board.runs) == {t.trial_id for t, _ in history}, "the agent hears every result"
    (key, only), = searcher.samplers.items()  # no code edit: one code base, one sampler
    stored = only.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(stored) == len(history), "the sampler hears every result, the agent's too"
    values = sorted(t.value for t in stored)
    assert values == pytest.approx(sorted(r.val_bpb for _, r in history))
    enqueued = [t for t, _ in history if t.candidate.meta.get("enqueued")]
    assert enqueued, "the agent's knob proposals run as the sampler's own trials"
    for trial in enqueued:
        number = trial.candidate.meta["optuna_trial"]
        assert stored[[t.number for t in stored].index(number)].params["MATRIX_LR"] == \
            pytest.approx(read_knobs(trial.candidate.source)["MATRIX_LR"])


def test_the_agent_sees_the_samplers_state_in_its_prompt(tmp_path):
    searcher, api, _ = run_hybrid(str(tmp_path), 40, edit_wave=None)
    prompts = [state_text(r) for r in api.requests if len(r["messages"]) == 1]
    assert all("## The sampler beside you (CMA-ES; it proposes 70% of the trials" in p for p in prompts)
    assert "It tunes MATRIX_LR, EMBEDDING_LR on top of the code of the baseline" in prompts[0]
    assert "CMA-ES search distribution: not formed yet" in prompts[0]
    last = prompts[-1]
    assert "Its top configurations" in last and "- val_bpb 2.0" in last
    assert "CMA-ES search distribution (generation" in last, last[-1500:]
    assert "MATRIX_LR: mean " in last and "1-sigma range [" in last
    sampler = next(iter(searcher.samplers.values()))
    injected = [t for t in sampler.study.get_trials(deepcopy=False)
                if "fixed_params" in t.system_attrs and "cma:generation" in t.system_attrs]
    assert injected, "the agent's knob proposals join CMA-ES's generations"


def test_a_code_edit_that_becomes_the_best_is_the_code_the_sampler_tunes(tmp_path):
    searcher, api, state = run_hybrid(str(tmp_path), 30, edit_wave=2)
    edits = [t for t, _ in state.history if CODE_EDIT in t.candidate.source and t.candidate.meta["hybrid_side"] == AGENT]
    assert edits, "the agent's wave 2 made a code edit"
    first_edit = min(edits, key=lambda t: t.index)
    later = [t for t, _ in state.history if t.candidate.meta["hybrid_side"] == SAMPLER and t.index > first_edit.index + 4]
    assert later and all(CODE_EDIT in t.candidate.source for t in later), "the sampler moved onto the edited code"
    assert len(searcher.samplers) == 2 and searcher.active == first_edit.candidate.meta["code_base"]
    bases = Counter(t.candidate.meta["code_base"] for t, _ in state.history)
    assert len(bases) == 2
    summary = searcher.summary()
    assert summary["hybrid_agent_improvements"] >= 1 and summary["hybrid_code_bases"] == 2
    assert state.best[1].val_bpb < 1.95 and CODE_EDIT in state.best[0].candidate.source


def test_kill_9_mid_hybrid_then_resume_keeps_the_split_and_both_sides_state(tmp_path):
    code = f"from tests.test_hybrid import run_hybrid; run_hybrid({str(tmp_path)!r}, 400)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    journal = tmp_path / "journal.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        js = JournalState.load(journal)
        if len(js.results) >= 14 and js.in_flight():
            break
        assert proc.poll() is None, "the study ended before it could be killed"
        time.sleep(0.02)
    else:
        raise AssertionError("the hybrid study did not get far enough within 240 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = JournalState.load(journal)

    total = len(before.trials) + 12
    searcher, api, state = run_hybrid(str(tmp_path), total)
    after = JournalState.load(journal)
    for tid, result in before.results.items():
        assert after.results[tid].to_dict() == result.to_dict()
    split = sides(journal)
    ran = len(after.trials)  # a trial folder made just before the kill skips its id, not a trial
    proposals = split[SAMPLER] + split[AGENT]
    assert ran == total and abs(split[SAMPLER] - 0.7 * proposals) <= 1.5, split
    assert set(searcher.agent.board.runs) == set(after.results), "the agent's scoreboard was rebuilt"
    for key, sampler in searcher.samplers.items():  # each code base's study holds each of its results once
        finished = [t for t, r in after.finished() if t.candidate.meta["code_base"] == key and r.status == "ok"]
        stored = sampler.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        assert len(stored) == len(finished), key
    events = Journal.read(journal)
    submitted = Counter(e["trial"]["trial_id"] for e in events if e["event"] == "submitted")
    assert all(submitted[tid] == 1 for tid in before.results)


def test_in_the_background_the_sampler_fills_the_slots_while_the_agent_thinks(tmp_path):
    journal = tmp_path / "journal.jsonl"

    def slow_first_wave(body):  # the model takes until 10 trials have finished to answer wave 1
        if wave_number(body) == 1 and len(body["messages"]) == 1:
            deadline = time.time() + 300  # a guard only: on a loaded machine 10 trials can take minutes
            while len(JournalState.load(journal).results) < 10 and time.time() < deadline:
                time.sleep(0.01)
        return agent(body)

    agent = EditingAgent(edit_wave=None)
    searcher = build(FakeMessagesAPI(policy=slow_first_wave), background=True)
    state = make_loop(tmp_path, searcher, 4, 40).run({"study_id": "background"})
    order = sorted(JournalState.load(journal).trials.values(), key=lambda t: t.index)
    first_wave = next(i for i, t in enumerate(order) if t.candidate.meta.get("agent_wave") == 1)
    # Before the model's first answer every slot ran something that needs no model call: the sampler's
    # trials, the baseline's noise seeds, or the keep rule's confirmations of a sampler trial.
    handed_out_by_the_agent_alone = {claude_board.BASELINE, claude_board.CONFIRM}
    assert first_wave >= 10 and all(t.candidate.meta["hybrid_side"] == SAMPLER or
                                    t.candidate.meta.get("role") in handed_out_by_the_agent_alone
                                    for t in order[:first_wave]), "no slot waited for the model"
    split = sides(journal)
    assert split[AGENT] >= 0.3 * sum(split.values()) - 4, f"the agent caught up on its share once it answered: {split}"
    assert set(searcher.agent.board.runs) == {t.trial_id for t, _ in state.history}


def test_bad_hybrid_settings_are_refused():
    api = FakeMessagesAPI()
    with pytest.raises(ValueError, match="sampler must be cmaes or tpe"):
        build(api, sampler="grid")
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\]"):
        build(api, share=1.5)


@pytest.mark.slow
def test_a_hybrid_study_end_to_end_logs_each_sides_share(tmp_path, monkeypatch):
    """`run_study` with conf/searcher/hybrid.yaml on the simulated launcher, real tiny training."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient

    from study.runner import run_study

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "searcher=hybrid", "objective=tiny", "progress=false", "launcher=simulated", "launcher.slots=3",
            "study.max_trials=7", "searcher.background=false", "searcher.agent.confirm_seeds=0", "searcher.agent.noise_seeds=1",
            f"study.dir={tmp_path}/study",
            f"mlflow.tracking_uri={uri}"])
    api = FakeMessagesAPI(policy=EditingAgent(edit_wave=None))
    agent = instantiate(cfg.searcher.agent, http_client=api.client(), max_retries=0, _convert_="all")
    searcher = instantiate(cfg.searcher, agent=agent, _convert_="all")
    state = run_study(cfg, searcher=searcher)

    finished = JournalState.load(tmp_path / "study" / "journal.jsonl").finished()
    assert len(finished) == 7 and all(r.status == "ok" for _, r in finished), [r.error for _, r in finished]
    split = sides(tmp_path / "study" / "journal.jsonl")
    assert split == {SAMPLER: 4, AGENT: 2}  # 0.7 of the 6 proposals (the baseline's seed is evidence, not an idea)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.study.experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("arena.kind") == "study")
    metrics = parent.data.metrics
    assert metrics["hybrid_sampler_trials"] == 4 and metrics["hybrid_agent_trials"] == 2
    assert metrics["hybrid_overhead_trials"] == 1 and metrics["hybrid_sampler_trial_share"] == pytest.approx(4 / 6)
    wins = metrics["hybrid_sampler_improvements"] + metrics["hybrid_agent_improvements"]
    kept = [t for i, t in enumerate(searcher.agent.board.kept) if i == 0 or t != searcher.agent.board.kept[i - 1]]
    assert wins == len(kept) - 1  # every change of the incumbent after the first is credited to a side
    assert metrics["agent_usd_total"] > 0
    proposers = Counter(r.data.tags["proposer"] for r in runs if r.data.tags.get("arena.kind") == "trial")
    assert proposers == {SAMPLER: 4, AGENT: 3}  # who handed each trial out, the baseline's seed included
    assert state.best is not None


def test_the_best_is_the_agents_incumbent_so_noise_or_a_faster_kind_never_moves_the_sampler(tmp_path):
    searcher = build(FakeMessagesAPI())
    kinds = {"cpu": {"count": 3, "speed": 1.0}, "fast": {"count": 1, "speed": 2.0}}
    ctx = SearchContext(baseline_source=BASELINE, baseline_knobs=read_knobs(BASELINE), space=SPACE, seed=0,
                        study_dir=str(tmp_path), objective={**OBJECTIVE, "budget_kind": "seconds"}, device_kinds=kinds)
    searcher.setup(ctx)
    edited = CODE_EDIT + BASELINE
    told = iter(range(100))

    def tell(source: str, val: float, kind: str, side: str, seed: int = 0, role: str | None = None) -> str:
        i = next(told)
        meta = {"hybrid_side": side, "code_base": searcher._base_key(source), **({"role": role} if role else {})}
        trial = Trial(trial_id=f"t{i:04d}", index=i, objective=ctx.objective, seed=seed, device_kind=kind,
                      candidate=Candidate(source=source, seed=seed, meta=meta), directory=str(tmp_path))
        searcher.tell(trial, Result(status="ok", val_bpb=val, device_kind=kind))
        return trial.trial_id

    for seed, val in enumerate((2.000, 2.004, 1.996)):  # the baseline's noise on cpu: margin 0.0113
        tell(BASELINE, val, "cpu", AGENT, seed, role="baseline")
    tell(BASELINE, 1.90, "fast", AGENT, role="baseline")  # the faster kind trains more in the same seconds
    base = searcher.active
    lucky = tell(write_knobs(BASELINE, {"MATRIX_LR": 0.03}), 1.995, "cpu", SAMPLER)  # within the seed noise
    assert searcher.best[1] == "t0000" and searcher.agent.board.runs[lucky].decision.startswith("confirming")
    tell(edited, 1.895, "fast", AGENT)  # below every cpu run, but only as good as the baseline on its own kind
    assert searcher.best[1] == "t0000" and searcher.active == base and len(searcher.samplers) == 1
    winner = tell(edited.replace("True", "1"), 1.95, "cpu", AGENT)  # a real gain: 0.05 over the margin
    assert searcher.best[1] == winner and searcher.active != base and len(searcher.samplers) == 2
    assert searcher.summary()["hybrid_agent_improvements"] == 1


def test_cma_es_carries_its_adaptation_to_the_new_code_base_and_a_resume_starts_it_the_same(tmp_path):
    from optuna._transform import _SearchSpaceTransform
    from optuna.study import StudyDirection

    from searchers.cma_carry import CarriedCmaEsSampler

    ctx = SearchContext(baseline_source=BASELINE, baseline_knobs=read_knobs(BASELINE), space=SPACE, seed=0,
                        study_dir=str(tmp_path), objective=OBJECTIVE, device_kinds={"cpu": {"count": 4}})
    searcher = build(FakeMessagesAPI())
    searcher.setup(ctx)
    told: list[tuple[Trial, Result]] = []

    def tell(candidate: Candidate) -> str:
        trial = Trial(trial_id=f"t{len(told):04d}", index=len(told), objective=OBJECTIVE, candidate=candidate,
                      seed=0, device_kind="cpu", directory=str(tmp_path))
        told.append((trial, Result(status="ok", val_bpb=synthetic_val_bpb(candidate.source), device_kind="cpu")))
        searcher.tell(*told[-1])
        return trial.trial_id

    for seed in range(3):  # the baseline's seeds: the keep rule's reference
        tell(searcher._mark(Candidate(source=BASELINE, seed=seed, meta={"role": "baseline"}), AGENT))
    old = searcher.samplers[searcher.active]
    cma = old.study.sampler
    for _ in range(60):  # CMA-ES's own trials until it has told (and stored) a generation
        tell(searcher._on_active_base(old.ask(1, ctx)[0]))
        if (optimizer := cma._restore_optimizer(cma._get_trials(old.study))) is not None:
            break
    assert optimizer is not None and optimizer.generation >= 1
    old_best = searcher.best[1]
    new_best = tell(searcher._mark(Candidate(source=CODE_EDIT + searcher.base_source[searcher.active],
                                             hypothesis="a code edit"), AGENT))
    assert searcher.best[1] == new_best and len(searcher.samplers) == 2, "the code edit is the new incumbent"
    new = searcher.samplers[searcher.active]
    carried = new.study.user_attrs[CARRIED]
    assert carried["sigma"] == pytest.approx(optimizer._sigma) and carried["generation"] == optimizer.generation
    assert np.asarray(carried["cov"]) == pytest.approx(optimizer._C)
    trans = _SearchSpaceTransform(cma.infer_relative_search_space(old.study, None), transform_step=True,
                                  transform_0_1=True)
    board = searcher.agent.board
    center = lambda tid: trans.transform(old._params(searcher._space_values(board.runs[tid].source)))  # noqa: E731
    expected = np.clip(center(new_best) + optimizer.mean - center(old_best), trans.bounds[:, 0], trans.bounds[:, 1])
    assert carried["mean"] == pytest.approx(expected.tolist()), "the mean keeps its offset from the incumbent"
    assert isinstance(new.study.sampler, CarriedCmaEsSampler)
    start = new.study.sampler._init_optimizer(trans, StudyDirection.MINIMIZE)
    assert start.mean == pytest.approx(carried["mean"]) and start._sigma == pytest.approx(carried["sigma"])
    assert start._C == pytest.approx(np.asarray(carried["cov"]))
    first = new.ask(1, ctx)[0]  # the new code base's CMA-ES samples around the carried mean, at the carried scale
    x = trans.transform(old._params(first.knobs))
    spread = carried["sigma"] * np.sqrt(np.diag(np.asarray(carried["cov"])))
    assert np.all(np.abs(x - np.asarray(carried["mean"])) <= 6 * spread + 1e-9), (x, carried)

    again = build(FakeMessagesAPI())  # a resume: the journal's results replayed into a fresh searcher
    again.setup(ctx)
    for trial, result in told:
        again.tell(trial, result)
    resumed = again.samplers[again.active]
    assert isinstance(resumed.study.sampler, CarriedCmaEsSampler) and resumed.study.sampler.carried == carried
