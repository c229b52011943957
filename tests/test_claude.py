"""The Claude searcher driven through the real `anthropic` SDK against a scripted Messages API
(tests/fake_anthropic.py); no test reaches the network. The end-to-end test runs a real study on
the local launcher with real (tiny) training."""
from __future__ import annotations

import difflib
import json
import math
import os
import statistics
import threading
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from searchers.claude import ClaudeSearcher, ClaudeSearcherError
from searchers.claude_board import Board
from study.core import SearchContext
from study.records import Candidate, Result, Trial
from tests import fake_anthropic
from tests.conftest import ROOT, run_arena
from tests.fake_anthropic import (
    EDITOR, ENV_DUMP, Drop, FakeMessagesAPI, Hang, KnobAgent, PromptCache, bad_key, credit_too_low, empty_reply,
    PopulationAgent, VirtualClock, knob_line, simulated_study, message, overloaded, rate_limited, refusal,
    spend_limit, text, thinking, tool_use, truncated,
)
from train.contract import LOG_FILE
from train.knobs import read_knobs, write_knobs

KEY = "sk-ant-api03-arenaTEST-0123456789abcdefghijklmnopqrstuvwxyz-SECRETSECRET"
# the searcher's settings as a study gives them (the study's limits are interpolated from its config)
CONF = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "searcher" / "claude.yaml")),
        "study_max_trials": None, "study_max_hours": None}
strict_fake = fake_anthropic.strict_fake  # the shared strictness fixture (autouse): no request the API refuses
TINY_KNOBS = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml"))["knobs"]
BASELINE = write_knobs((ROOT / "train" / "train.py").read_text(), TINY_KNOBS)



CLOCK: list[VirtualClock] = []


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


@pytest.fixture(autouse=True)
def virtual_time(monkeypatch) -> VirtualClock:
    """The searcher's waits and the SDK's retry sleeps (a 429's retry-after, its own backoff) pass
    on a virtual clock: an hour-long storm costs no real time; hung calls still time out for real."""
    CLOCK[:] = [VirtualClock().install_in_sdk(monkeypatch)]
    return CLOCK[0]


def _price(usage: dict, p: dict, multiplier: float = 1.0) -> float:
    """What one usage block costs at price row `p`, written out from the pricing page's definitions."""
    split = usage["cache_creation"]
    return multiplier * (usage["input_tokens"] * p["input"] + split["ephemeral_5m_input_tokens"] * p["cache_write_5m"]
                         + split["ephemeral_1h_input_tokens"] * p["cache_write_1h"]
                         + usage["cache_read_input_tokens"] * p["cache_read"] + usage["output_tokens"] * p["output"]) / 1e6


def build(api: FakeMessagesAPI, **overrides) -> ClaudeSearcher:
    kwargs = {k: v for k, v in CONF.items() if k != "_target_"}
    # one wave per ask and one baseline seed, unless a test says otherwise: the conversation tests read simply
    kwargs.update({"max_retries": 2, "wave_backoff_s": 0, "background": False, "noise_seeds": 1, "clock": CLOCK[0],
                   **overrides})
    return ClaudeSearcher(**kwargs, http_client=api.client())


def make_ctx(tmp_path, budget_kind="steps", kinds=None) -> SearchContext:
    return SearchContext(baseline_source=BASELINE, baseline_knobs=read_knobs(BASELINE), space={}, seed=0,
                         study_dir=str(tmp_path / "study"),
                         objective={"budget_kind": budget_kind, "budget": 8, "hard_limit_s": 60, "warmup_steps": 1,
                                    "corpus": "austen", "vocab_size": 512},
                         device_kinds=kinds or {"cpu": {"count": 2, "speed": 1.0}})


def started(ctx: SearchContext, searcher: ClaudeSearcher, cand: Candidate, index: int, kind: str = "cpu") -> Trial:
    """What the loop does with a candidate: a trial with its own directory."""
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=cand, objective=ctx.objective,
                  seed=ctx.seed if cand.seed is None else cand.seed, device_kind=kind)
    d = Path(ctx.study_dir) / "trials" / trial.trial_id
    d.mkdir(parents=True)
    trial.directory = str(d)
    (d / "train.py").write_text(cand.source)
    return trial


def finish(searcher, trial: Trial, val_bpb: float | None, status: str = "ok", log: str = "step 8 loss 5.1") -> None:
    (Path(trial.directory) / LOG_FILE).write_text(log + "\n")
    searcher.tell(trial, Result(status=status, val_bpb=val_bpb, device_kind=trial.device_kind,
                                error=None if status == "ok" else "Traceback: boom"))


def tool_results(request: dict) -> list[dict]:
    return [b for b in request["messages"][-1]["content"] if b.get("type") == "tool_result"]


def baseline_line(knob: str) -> str:
    return knob_line("\n".join(f"{i}\t{l}" for i, l in enumerate(BASELINE.splitlines(), 1)), knob)


# -- configuration -------------------------------------------------------------------------------
def test_no_api_key_is_one_clear_line(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ClaudeSearcherError) as e:
        build(FakeMessagesAPI())
    assert "ANTHROPIC_API_KEY" in str(e.value) and "\n" not in str(e.value)


def test_run_py_without_a_key_stops_in_one_line_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    proc = run_arena(tmp_path, "objective=tiny", "progress=false", "searcher=claude", "~space", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "ANTHROPIC_API_KEY" in last
    assert not list(tmp_path.glob("studies/*/trials/*")), "no trial may start without a key"


def test_a_model_without_a_price_is_refused():
    with pytest.raises(ClaudeSearcherError, match="no price for model 'claude-unknown'"):
        build(FakeMessagesAPI(), model="claude-unknown")


@pytest.mark.parametrize("settings, words", [
    ({"thinking": {"type": "enabled", "budget_tokens": 4000}}, "does not take thinking type 'enabled'"),
    ({"thinking": {"type": "disabled"}}, "does not take thinking type 'disabled'"),
    ({"thinking": {"type": "sometimes"}}, "thinking.type must be one of"),
    ({"effort": "ultra"}, "has no effort 'ultra'"),
    ({"max_tokens": 200_000}, "outside 1..128000"),
    ({"truncation_max_tokens": 130_000}, "outside 1..128000"),
    ({"model": "claude-sonnet-5-5", "effort": "xhigh"}, "claude-sonnet-5-5 has no effort 'xhigh'"),
    ({"fallback_models": ["claude-opus-9"]}, "no price for model 'claude-opus-9'"),
    ({"fallback_models": [{"model": "claude-sonnet-5-5"}], "effort": "xhigh"}, "claude-sonnet-5-5 has no effort"),
    ({"fallback_models": [{"model": "claude-opus-4-8", "thinking": {"type": "enabled", "budget_tokens": 2000}}]},
     "claude-opus-4-8 does not take thinking type 'enabled'"),
    ({"models": {}}, "searcher.models is empty"),
])
def test_settings_a_model_refuses_are_one_line_errors_before_any_call(settings, words):
    api = FakeMessagesAPI()
    with pytest.raises(ClaudeSearcherError, match=re.escape(words)) as e:
        build(api, **settings)
    assert "\n" not in str(e.value) and api.requests == []


def test_every_setting_the_searcher_accepts_the_strict_fake_accepts_too():
    """The config's model table and the fake's agree: what passes the check at construction is
    what the API takes (so neither can drift into accepting what the other refuses)."""
    from tests.fake_anthropic import MODELS, validate

    for model, row in CONF["models"].items():
        assert MODELS[model] == row, model
    for model, row in CONF["models"].items():
        for thinking_type in row["thinking"]:
            thinking_conf = {"type": thinking_type}
            searcher = build(FakeMessagesAPI(), model=model, thinking=thinking_conf, effort=row["effort"][-1],
                             max_tokens=row["max_tokens"], truncation_max_tokens=row["max_tokens"], fallback_models=[])
            searcher.tools, searcher.system = [], "the program"
            validate(searcher._request([{"role": "user", "content": [{"type": "text", "text": "x"}]}], None), {})


# -- a wave through the SDK -------------------------------------------------------------------------
def test_a_wave_edits_candidates_through_the_sdk(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 2.0]))
    searcher, ctx = build(api), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(3, ctx)

    assert [c.meta["role"] for c in out] == ["baseline", "agent", "agent"]
    assert out[0].source == BASELINE
    lr = read_knobs(BASELINE)["MATRIX_LR"]
    for cand, factor in zip(out[1:], [0.5, 2.0]):
        assert cand.knobs == {"MATRIX_LR": lr * factor}
        assert read_knobs(cand.source) == {**read_knobs(BASELINE), **cand.knobs}
        changed = [l for l in difflib.ndiff(BASELINE.splitlines(), cand.source.splitlines()) if l[:1] in "+-"]
        assert len(changed) == 2, changed  # one line out, one line in: the edit and nothing else
        assert cand.parent is None and "MATRIX_LR" in cand.hypothesis

    first = api.requests[0]
    assert first["model"] == CONF["model"] and first["thinking"] == CONF["thinking"]
    assert {"type": "text_editor_20250728", "name": EDITOR} == {k: first["tools"][0][k] for k in ("type", "name")}
    assert {t["name"] for t in first["tools"][1:]} == {"read_results", "read_trial", "start_from", "combine",
                                                        "submit_candidate", "sweep", "rerun", "reflect", "keep_note",
                                                        "analyze"}
    system = first["system"][0]
    assert system["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert BASELINE in system["text"] and "`cpu`: 2 slot(s), relative speed 1.0" in system["text"]
    assert "the margin is 0.01" in system["text"] and "8 optimizer steps" in system["text"]
    assert "$" not in system["text"].split("## The baseline train.py")[0], "every placeholder is filled"
    # thinking blocks go back exactly as received; breakpoints: the previous request's tail and this one's
    assert api.requests[1]["messages"][1]["content"] == api.responses[0][1]["content"]
    marks = [b for m in api.requests[1]["messages"] for b in m["content"] if "cache_control" in b]
    assert marks == [api.requests[1]["messages"][0]["content"][-1], api.requests[1]["messages"][-1]["content"][-1]]

    transcript = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert transcript["outcome"] == "ok" and [s["file"] for s in transcript["submitted"]] == ["c1", "c2"]
    assert transcript["messages"][1]["content"] == api.responses[0][1]["content"]
    assert (tmp_path / "study" / "agent" / "notes.md").read_text() == "wave 1: tried MATRIX_LR"


def test_cost_adds_up_from_the_usage_fields(tmp_path):
    api = FakeMessagesAPI([message(text("Let me think first."), output_tokens=50)],
                          policy=KnobAgent("MATRIX_LR", [0.5, 2.0, 0.8]))
    searcher, ctx = build(api, max_nudges=1, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(3, ctx)  # a reminded turn, then a full wave of 3
    assert [c.knobs["MATRIX_LR"] / read_knobs(BASELINE)["MATRIX_LR"] for c in out] == pytest.approx([0.5, 2.0, 0.8])

    p = CONF["prices"][CONF["model"]]
    expected = sum(u["input_tokens"] * p["input"] + u["cache_creation"]["ephemeral_5m_input_tokens"] * p["cache_write_5m"]
                   + u["cache_creation"]["ephemeral_1h_input_tokens"] * p["cache_write_1h"]
                   + u["cache_read_input_tokens"] * p["cache_read"] + u["output_tokens"] * p["output"]
                   for u in api.usages()) / 1e6
    summary = searcher.summary()
    assert summary["agent_usd_total"] == pytest.approx(expected)
    assert summary["agent_calls"] == len(api.usages()) == 4
    assert summary["agent_output_tokens"] == sum(u["output_tokens"] for u in api.usages())
    assert summary["agent_cache_read_tokens"] == sum(u["cache_read_input_tokens"] for u in api.usages())
    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()]
    assert sum(r["usd"] for r in rows) == pytest.approx(expected) and rows[-1]["usd_total"] == pytest.approx(expected)
    assert sum(c.meta["agent_usd"] for c in out) == pytest.approx(expected)
    assert sum(c.meta["agent_input_tokens"] for c in out) == pytest.approx(summary["agent_input_tokens"])


# -- tools: confinement and checks ----------------------------------------------------------------
def test_path_traversal_and_fixed_files_are_refused(tmp_path):
    evil = tmp_path / "evil.py"
    prepare = (ROOT / "train" / "prepare.py").read_bytes()
    old = baseline_line("WEIGHT_DECAY")
    api = FakeMessagesAPI([
        message(thinking(),
                tool_use(EDITOR, {"command": "view", "path": "../../../etc/passwd"}),
                tool_use(EDITOR, {"command": "create", "path": str(evil), "file_text": "x = 1\n"}),
                tool_use(EDITOR, {"command": "str_replace", "path": "train/prepare.py",
                                  "old_str": "def evaluate_bpb", "new_str": "def _evaluate_bpb"}),
                tool_use(EDITOR, {"command": "create", "path": "c1/../train/run.py", "file_text": ""}),
                tool_use(EDITOR, {"command": "view", "path": "/train/prepare.py", "view_range": [1, 5]})),
        message(tool_use(EDITOR, {"command": "str_replace", "path": "/c1/train.py", "old_str": old,
                                  "new_str": old.replace("=", "= 0.5 *", 1)})),
        message(tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "halve weight decay"})),
    ])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)

    results = tool_results(api.requests[1])
    assert [bool(r.get("is_error")) for r in results] == [True, True, True, True, False]
    assert "outside this wave's workspace" in results[0]["content"]
    assert "fixed" in results[2]["content"] and "fixed" in results[3]["content"]
    assert "1\t" in results[4]["content"]  # the fixed files can be read
    assert not evil.exists() and (ROOT / "train" / "prepare.py").read_bytes() == prepare
    assert len(out) == 1 and out[0].knobs == {"WEIGHT_DECAY": 0.5 * read_knobs(BASELINE)["WEIGHT_DECAY"]}
    assert searcher.summary()["agent_refused_tool_calls"] == 4


def test_a_broken_candidate_goes_back_to_the_model_as_feedback(tmp_path):
    old = baseline_line("MATRIX_LR")
    broken = old.replace("=", "= (", 1)
    api = FakeMessagesAPI([
        message(tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": old, "new_str": broken}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "lower LR"})),
        message(thinking(), tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": broken,
                                              "new_str": "MATRIX_LR = 0.03"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "lower LR"})),
    ])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)

    first = tool_results(api.requests[1])
    assert not first[0].get("is_error") and first[1]["is_error"] and "does not compile" in first[1]["content"]
    assert len(out) == 1 and out[0].knobs == {"MATRIX_LR": 0.03}
    compile(out[0].source, "train.py", "exec")
    assert searcher.summary()["agent_broken_submissions"] == 1


def test_unchanged_and_duplicate_candidates_are_refused(tmp_path):
    old = baseline_line("MATRIX_LR")
    api = FakeMessagesAPI([
        message(tool_use(EDITOR, {"command": "insert", "path": "c1/train.py",
                                  "insert_line": BASELINE.splitlines().index(old),
                                  "insert_text": "# a comment changes nothing that runs\n"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "a new seed"})),
        message(tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": old,
                                  "new_str": "MATRIX_LR  =  0.03   # same value, other layout"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "lower LR"})),
        message(tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": "MATRIX_LR  =  0.03",
                                  "new_str": "MATRIX_LR = 0.05"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "higher LR"})),
    ])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    ctx.in_flight = [started(ctx, searcher, Candidate(source=write_knobs(BASELINE, {"MATRIX_LR": 0.03}),
                                                      hypothesis="someone else's idea"), 7)]
    out = searcher.ask(1, ctx)

    assert "same code as its starting point" in tool_results(api.requests[1])[1]["content"]
    assert "same code as t0007" in tool_results(api.requests[2])[1]["content"]
    assert [c.knobs for c in out] == [{"MATRIX_LR": 0.05}] and "# a comment changes nothing" in out[0].source


def test_a_candidate_still_waiting_for_a_slot_is_not_proposed_twice(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.5, 0.7]))
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    first = searcher.ask(1, ctx)  # the loop holds it until a slot frees
    second = searcher.ask(1, ctx)
    state = api.requests[3]["messages"][0]["content"][0]["text"]
    assert f"(waiting for a slot) {first[0].hypothesis}" in state
    refused = tool_results(api.requests[6])  # wave 2: view, edit, submit -> refused; then the agent tries again
    assert refused[1]["is_error"] and "same code as candidate c1 of wave 1" in refused[1]["content"]
    assert [c.knobs["MATRIX_LR"] for c in second] == pytest.approx([read_knobs(BASELINE)["MATRIX_LR"] * 0.5 * 0.7])


def test_results_logs_and_diffs_are_readable_and_start_from_sets_the_parent(tmp_path):
    searcher, ctx = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5]))), make_ctx(tmp_path)
    searcher.setup(ctx)
    base, cand = searcher.ask(2, ctx)
    t0, t1 = started(ctx, searcher, base, 0), started(ctx, searcher, cand, 1)
    finish(searcher, t0, 2.50)
    finish(searcher, t1, 2.60, log="step 8 loss 5.3\nfinal note from t0001")

    old = knob_line("\n".join(f"0\t{l}" for l in cand.source.splitlines()), "MATRIX_LR")
    api = FakeMessagesAPI([
        message(tool_use("read_results", {"top": 5, "last": 5}),
                tool_use("read_trial", {"trial_id": "t0001", "part": "log", "lines": 1}),
                tool_use("read_trial", {"trial_id": "t0001", "part": "diff", "against": "baseline"}),
                tool_use("start_from", {"candidate": "c1", "trial_id": "t0001"})),
        message(tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": old,
                                  "new_str": "MATRIX_LR = 0.011"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "even lower LR"})),
    ])
    searcher.client = build(api).client
    out = searcher.ask(1, ctx)
    table, log, diff, _ = (r["content"] for r in tool_results(api.requests[1]))
    assert "t0000\tok\t2.5000" in table and "t0001\tok\t2.6000\t+0.1000" in table and "discarded" in table
    assert log == "final note from t0001"
    assert f"-{baseline_line('MATRIX_LR')}" in diff and f"+{old}" in diff
    assert out[0].parent == "t0001" and out[0].knobs == {"MATRIX_LR": 0.011}


# -- the keep rule ----------------------------------------------------------------------------------
def _run(board: Board, tid: str, source: str, val: float | None, *, seed=0, kind="cpu", meta=None,
         status="ok", index=None) -> None:
    cand = Candidate(source=source, seed=seed, meta=meta or {})
    trial = Trial(trial_id=tid, index=index if index is not None else int(tid[1:]), candidate=cand, objective={},
                  seed=seed, device_kind=kind)
    board.record(trial, Result(status=status, val_bpb=val, device_kind=kind))


def _board(**kw) -> Board:
    args = dict(noise_margin=0.01, confirm_seeds=2, kind_sensitive=False, wait_for_baseline=True, max_elites=4)
    return Board(BASELINE, **{**args, **kw})


def test_a_clear_win_is_kept_and_a_loss_or_a_failure_is_not():
    b = _board()
    _run(b, "t0000", BASELINE, 2.00)
    _run(b, "t0001", "A = 1\n", 2.05)
    _run(b, "t0002", "B = 1\n", None, status="crash")
    assert b.best_id == "t0000"
    _run(b, "t0003", "C = 1\n", 1.98)
    assert b.best_id == "t0003" and b.best_source() == "C = 1\n"
    assert b.runs["t0001"].decision.startswith("discarded") and b.runs["t0002"].decision == "crash"


@pytest.mark.parametrize("reruns, kept", [((1.994, 1.996), True), ((2.01, 2.02), False)])
def test_a_win_within_noise_is_judged_on_fresh_seeds_paired_with_the_incumbent(reruns, kept):
    b = _board()
    _run(b, "t0000", BASELINE, 2.00)
    _run(b, "t0001", "A = 1\n", 1.995, seed=0)
    assert b.best_id == "t0000" and b.runs["t0001"].decision.startswith("confirming")
    jobs = b.confirmations_due(set())
    assert sorted((j.of, j.seed) for j in jobs) == [("t0000", 1), ("t0000", 2), ("t0001", 1), ("t0001", 2)]
    assert b.confirmations_due({j.key for j in jobs}) == []
    values = {"t0001": iter(reruns), "t0000": iter((2.0, 2.0))}
    for i, job in enumerate(jobs):
        _run(b, f"t00{10 + i}", job.source, next(values[job.of]), seed=job.seed,
             meta={"role": "confirm", "confirms": "t0001"})
    assert (b.best_id == "t0001") is kept
    if kept:  # the fresh runs only: the run that made it a challenger (1.995) is not counted
        assert b.best_score() == pytest.approx((1.994 + 1.996) / 2)
    else:
        assert "rejected after re-runs" in b.runs["t0001"].decision


def test_without_reruns_a_win_within_noise_is_discarded():
    b = _board(confirm_seeds=0)
    _run(b, "t0000", BASELINE, 2.00)
    _run(b, "t0001", "A = 1\n", 1.995)
    assert b.best_id == "t0000" and "within noise" in b.runs["t0001"].decision and not b.confirmations_due(set())


def test_candidates_wait_for_the_baseline_before_being_judged():
    b = _board()
    _run(b, "t0001", "A = 1\n", 2.05, index=1)
    assert b.best_id is None and "waiting" in b.runs["t0001"].decision
    _run(b, "t0000", BASELINE, 2.00, index=0)
    assert b.best_id == "t0000" and b.runs["t0001"].decision.startswith("discarded")


def test_under_a_seconds_budget_a_score_is_judged_against_the_baseline_on_its_own_kind():
    b = _board(kind_sensitive=True)
    _run(b, "t0000", BASELINE, 2.00, kind="H100")
    _run(b, "t0001", "A = 1\n", 1.90, kind="H200")  # far below the H100 baseline, but on the faster kind
    assert b.best_id == "t0000" and "waiting for the baseline on H200" in b.runs["t0001"].decision
    _run(b, "t0002", BASELINE, 1.89, kind="H200")  # the baseline on H200: the faster kind alone did it
    assert b.best_id == "t0000" and b.runs["t0001"].decision.startswith("discarded")
    _run(b, "t0003", "B = 1\n", 1.80, kind="H200")  # a real gain: 0.09 below the baseline on its own kind
    assert b.best_id == "t0003" and b.runs["t0003"].decision.startswith("kept: +0.0900")


def test_the_noise_margin_is_measured_from_the_baselines_seeds():
    b = _board(noise_margin=0.5)
    for i, v in enumerate((2.000, 2.004, 1.996)):
        _run(b, f"t000{i}", BASELINE, v, seed=i)
    sigma = statistics.stdev((2.000, 2.004, 1.996))
    assert b.sigma(None) == pytest.approx(sigma) and b.margin(None) == pytest.approx(2 * sigma * math.sqrt(2))
    _run(b, "t0003", "A = 1\n", 2.0 - 0.02)  # beats a 0.5 configured margin? no; the measured one (0.011)? yes
    assert b.best_id == "t0003"
    assert "sigma 0.0040 from 3 baseline seed(s)" in b.noise_lines([])[0]


def test_near_equal_candidates_join_the_frontier_and_a_clear_win_prunes_it():
    b = _board(confirm_seeds=0, max_elites=3)
    _run(b, "t0000", BASELINE, 2.00)
    for i, v in enumerate((1.995, 2.004, 1.999, 2.003), start=1):
        _run(b, f"t000{i}", f"A = {i}\n", v)
    assert [e.trial_id for e, _ in b.frontier()] == ["t0000", "t0001", "t0003"]
    assert "frontier full" in b.runs["t0004"].decision and b.runs["t0002"].decision.startswith("elite")
    assert "left the frontier" in b.runs["t0002"].decision
    _run(b, "t0005", "B = 1\n", 1.9889)  # wins by 0.0111: t0001 (0.0061 behind) stays, t0003 (0.0101) goes
    assert b.best_id == "t0005" and [e.trial_id for e, _ in b.frontier()] == ["t0005", "t0001"]


def _baselines_and_one_candidate(searcher, ctx, scores=(2.000, 2.001, 1.999)):
    """Three baseline seeds (the noise: sigma 0.001, margin 0.0028) and the agent's first candidate."""
    out = searcher.ask(4, ctx)
    assert [c.meta["role"] for c in out] == ["baseline"] * 3 + ["agent"] and [c.seed for c in out[:3]] == [0, 1, 2]
    for i, (c, v) in enumerate(zip(out, scores)):
        finish(searcher, started(ctx, searcher, c, i), v)
    return out[3]


def test_a_challenger_is_judged_against_the_new_incumbent_if_one_won_meanwhile():
    b = _board()
    _run(b, "t0000", BASELINE, 2.00)
    _run(b, "t0001", "A = 1\n", 1.995)  # within noise: confirming against t0000
    _run(b, "t0002", "B = 1\n", 1.97)  # a clear win while the re-runs are out
    assert b.best_id == "t0002"
    for i, job in enumerate(b.confirmations_due(set())):
        _run(b, f"t00{10 + i}", job.source, 1.994 if job.of == "t0001" else 2.0, seed=job.seed,
             meta={"role": "confirm", "confirms": "t0001"})
    decision = b.runs["t0001"].decision
    assert b.best_id == "t0002" and "vs the new incumbent t0002" in decision and "+0.0240" not in decision
    assert decision.startswith("rejected after re-runs: -0.0240")


def test_a_challenger_whose_rerun_crashes_is_rejected():
    b = _board()
    _run(b, "t0000", BASELINE, 2.00)
    _run(b, "t0001", "A = 1\n", 1.995)
    job = next(j for j in b.confirmations_due(set()) if j.of == "t0001")
    _run(b, "t0002", job.source, None, seed=job.seed, status="nan", meta={"role": "confirm", "confirms": "t0001"})
    assert b.best_id == "t0000" and b.runs["t0001"].decision == "rejected: re-run t0002 nan"
    assert not b.challenges and not b.confirmations_due(set())


def test_the_searcher_issues_reruns_itself_without_calling_the_api(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.9]))
    searcher, ctx = build(api, noise_seeds=3), make_ctx(tmp_path)
    searcher.setup(ctx)
    cand = _baselines_and_one_candidate(searcher, ctx)
    t3 = started(ctx, searcher, cand, 3)
    finish(searcher, t3, 1.998)  # -0.002: within the measured margin
    calls = len(api.requests)
    reruns = searcher.ask(4, ctx)
    assert len(api.requests) == calls + 3, "re-runs need no model call (the rest of the ask is a new wave)"
    confirms = [c for c in reruns if c.meta["role"] == "confirm"]
    # the baseline (the incumbent) already ran seeds 1 and 2: only the challenger is re-run
    assert [(c.source, c.parent) for c in confirms] == [(cand.source, "t0003")] * 2
    assert sorted(c.seed for c in confirms) == [t3.seed + 1, t3.seed + 2]
    for i, c in enumerate(confirms):
        finish(searcher, started(ctx, searcher, c, 4 + i), 1.990)
    assert searcher.board.best_id == "t0003" and searcher.summary()["agent_kept"] == 1


def test_reruns_outlive_a_stopped_agent_and_infrastructure_failures(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.9]))
    searcher, ctx = build(api, noise_seeds=3), make_ctx(tmp_path)
    searcher.setup(ctx)
    cand = _baselines_and_one_candidate(searcher, ctx)
    finish(searcher, started(ctx, searcher, cand, 3), 1.998)
    api.policy, api.script = None, [credit_too_low()]
    reruns = searcher.ask(3, ctx)  # two re-runs, and a wave that meets an empty account
    assert [c.meta["role"] for c in reruns] == ["confirm", "confirm"] and searcher.stop_reason
    assert not searcher.done(), "the keep rule still waits for its re-runs"
    calls = len(api.requests)
    lost = started(ctx, searcher, reruns[0], 4)
    finish(searcher, lost, None, status="lost")
    again = searcher.ask(2, ctx)
    assert [(c.seed, c.meta["role"]) for c in again] == [(lost.seed, "confirm")] and len(api.requests) == calls
    finish(searcher, started(ctx, searcher, again[0], 5), 1.990)
    finish(searcher, started(ctx, searcher, reruns[1], 6), 1.990)
    assert searcher.board.best_id == "t0003" and searcher.done()


def test_a_cancelled_baseline_is_run_again(tmp_path):
    searcher, ctx = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.7]))), make_ctx(tmp_path)
    searcher.setup(ctx)
    base, _ = searcher.ask(2, ctx)
    finish(searcher, started(ctx, searcher, base, 0), None, status="cancelled")
    assert [c.meta["role"] for c in searcher.ask(2, ctx)] == ["baseline", "agent"]


def test_malformed_tool_input_is_an_error_the_model_reads(tmp_path):
    old = baseline_line("MATRIX_LR")
    api = FakeMessagesAPI([
        message(tool_use("read_trial", {"trial_id": "t9999", "part": "log"}),
                tool_use("read_results", {"top": "many"}),
                tool_use("no_such_tool", {}),
                tool_use(EDITOR, {"command": "view", "path": "c1/train.py", "view_range": [0, 10**6]})),
        message(tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py", "old_str": old,
                                  "new_str": "MATRIX_LR = 0.03"}),
                tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "lower LR"})),
    ])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    errors = tool_results(api.requests[1])
    assert all(r["is_error"] for r in errors) and "no trial 't9999'" in errors[0]["content"]
    assert "TypeError" in errors[1]["content"] and "unknown tool" in errors[2]["content"]
    assert len(out) == 1 and searcher.summary()["agent_tool_errors"] == 4


# -- what the real API returns besides tool calls -----------------------------------------------------
def _edit_and_submit(knob: str = "MATRIX_LR", value: str = "0.03") -> tuple:
    return message(thinking(), tool_use(EDITOR, {"command": "str_replace", "path": "c1/train.py",
                                                 "old_str": baseline_line(knob), "new_str": f"{knob} = {value}"}),
                   tool_use("submit_candidate", {"candidate": "c1", "hypothesis": f"{knob} {value}"}))


def test_an_empty_reply_is_never_sent_back_and_the_model_is_asked_to_continue(tmp_path):
    api = FakeMessagesAPI([message(thinking(), tool_use(EDITOR, {"command": "view", "path": "c1/train.py"})),
                           empty_reply(), _edit_and_submit()])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    assert [c.knobs for c in out] == [{"MATRIX_LR": 0.03}]
    after = api.requests[2]["messages"]
    assert [m["role"] for m in after] == ["user", "assistant", "user"], "no empty assistant turn"
    assert after[-1]["content"][0]["type"] == "tool_result" and after[-1]["content"][-1]["text"] == "Please continue."
    assert searcher.summary()["agent_empty_replies"] == 1


def test_a_reply_cut_off_at_max_tokens_is_asked_again_once_with_more_room_streamed(tmp_path):
    half_file = "\n".join(BASELINE.splitlines()[:2])  # what a create cut off mid-file would write
    api = FakeMessagesAPI([
        truncated(thinking(), tool_use(EDITOR, {"command": "create", "path": "c1/train.py", "file_text": half_file}),
                  tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "rewrite"})),
        _edit_and_submit(),
    ])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    assert len(out) == 1 and len(out[0].source.splitlines()) == len(BASELINE.splitlines()), "the cut call never ran"
    first, again = api.requests[:2]
    assert again["messages"] == first["messages"] or [m["content"] for m in again["messages"]] == \
        [m["content"] for m in first["messages"]], "the same request, nothing of the cut reply in it"
    assert (first["max_tokens"], again["max_tokens"]) == (CONF["max_tokens"], CONF["truncation_max_tokens"])
    assert not first.get("stream") and again["stream"] is True, "over the SDK's non-streaming limit: streamed"
    summary = searcher.summary()
    assert summary["agent_truncated_replies"] == 1 and summary["agent_larger_retries"] == 1
    # the streamed answer was priced like any other (usage from the final message)
    assert summary["agent_calls"] == 2 and summary["agent_output_tokens"] == sum(u["output_tokens"] for u in api.usages())


def test_a_reply_cut_off_even_with_more_room_is_dropped_and_the_model_told_to_take_smaller_steps(tmp_path):
    cut = lambda: truncated(thinking(), tool_use(EDITOR, {"command": "view", "path": "c1/train.py"}))  # noqa: E731
    api = FakeMessagesAPI([cut(), cut(), _edit_and_submit()])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    nudged = api.requests[2]
    assert nudged["max_tokens"] == CONF["max_tokens"] and "cut off at max_tokens" in nudged["messages"][0]["content"][-1]["text"]
    assert [m["role"] for m in nudged["messages"]] == ["user"], "no cut-off turn goes back"
    assert searcher.summary()["agent_truncated_replies"] == 2


def test_a_full_context_window_restarts_the_conversation_from_the_compact_state(tmp_path):
    api = FakeMessagesAPI([message(thinking(), tool_use(EDITOR, {"command": "view", "path": "c1/train.py"})),
                           fake_anthropic.context_full(thinking(), text("Let me look at")), _edit_and_submit()])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    restarted = api.requests[2]["messages"]
    assert len(restarted) == 1 and restarted[0]["content"][0]["text"].startswith("# Wave 1")
    assert "filled the model's context window" in restarted[0]["content"][0]["text"]
    assert api.requests[2]["max_tokens"] == CONF["max_tokens"], "more output room would not help a full context"
    summary = searcher.summary()
    assert summary["agent_context_resets"] == 1 and summary["agent_truncated_replies"] == 0


def test_a_blank_text_block_is_dropped_before_the_turn_goes_back_and_thinking_is_untouched(tmp_path):
    thought = thinking("Viewing first.")
    api = FakeMessagesAPI([message(thought, text("  \n\t"), tool_use(EDITOR, {"command": "view", "path": "c1/train.py"})),
                           message(thinking(), text("\n"), text("Now the edit."), *_edit_and_submit()[1]["content"][1:])])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    returned = api.requests[1]["messages"][1]["content"]
    assert [b["type"] for b in returned] == ["thinking", "tool_use"] and returned[0] == thought
    assert searcher.summary()["agent_blank_blocks_dropped"] == 2
    transcript = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert [b["type"] for b in transcript["messages"][3]["content"]] == ["thinking", "text", "tool_use", "tool_use"]


# -- refusals ----------------------------------------------------------------------------------------
def refusing(model: str, then, category: str | None = "frontier_llm"):
    """A policy: `model` refuses every request; any other model answers as `then` does."""
    def answer(body):
        return refusal(category) if body["model"] == model else then(body)
    return answer


def test_a_refusal_is_answered_by_the_fallback_model_which_keeps_the_rest_of_the_wave(tmp_path):
    api = FakeMessagesAPI(policy=refusing(CONF["model"], KnobAgent("MATRIX_LR", [0.5])), cache=True)
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    assert len(out) == 1 and out[0].knobs == {"MATRIX_LR": read_knobs(BASELINE)["MATRIX_LR"] * 0.5}
    fallback = CONF["fallback_models"][0]
    # refused once, then the SDK's middleware re-sent it to the fallback; the wave stays pinned there
    assert api.models() == [CONF["model"], fallback, fallback, fallback]
    retry = api.requests[1]
    assert retry["fallback_credit_token"]["token"].startswith("fct_")
    assert "fallback-credit-2026-07-01" in api.headers[1]["anthropic-beta"]
    assert api.usages()[1]["fallback_credit"] == {"status": {"type": "redeemed"}}
    assert {k: v for k, v in retry.items() if k != "fallback_credit_token" and k != "model"} == \
        {k: v for k, v in api.requests[0].items() if k != "model"}, "the same request, on another model"

    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == api.models()
    assert rows[0]["refusal"] == {"model": CONF["model"], "category": "frontier_llm", "fallback": True,
                                  "explanation": "This request may assist the development of competing AI models."}
    for row, usage in zip(rows[1:], api.usages()[1:]):  # each answer at its own model's price row
        assert row["usd"] == pytest.approx(_price(usage, CONF["prices"][fallback]))
    wave = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert wave["outcome"] == "ok" and wave["refusals"] == [rows[0]["refusal"]]
    assert wave["fallbacks"] == [{"from": CONF["model"], "to": fallback, "category": "frontier_llm"}]
    assert all(b["type"] != "fallback" for m in api.requests[2]["messages"] for b in m["content"])
    summary = searcher.summary()
    assert summary["agent_refusals_frontier_llm"] == 1 and summary["agent_fallback_answers"] == 1


def test_a_refusal_storm_on_the_requested_model_is_survived_wave_after_wave(tmp_path):
    api = FakeMessagesAPI(policy=refusing(CONF["model"], KnobAgent("MATRIX_LR", [0.5, 0.6, 0.7, 0.8, 0.9, 1.1])))
    searcher, ctx = build(api, run_baseline=False, max_failed_waves=2, max_refusals=0), make_ctx(tmp_path)
    searcher.setup(ctx)
    for wave in range(6):
        assert len(searcher.ask(1, ctx)) == 1 and not searcher.done(), wave
    summary = searcher.summary()
    assert summary["agent_refusals"] == 6 and summary["agent_fallback_answers"] == 6
    assert summary["agent_waves"] == 6 and summary["agent_waves_skipped"] == 0 and summary["agent_stop_reason"] == ""


def test_a_refusal_before_any_output_costs_nothing_and_says_why(tmp_path):
    api = FakeMessagesAPI([refusal("frontier_llm", before_output=True)], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    row = json.loads((tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()[0])
    assert row["usd"] == 0.0 and row["unbilled"] == "refused before any output" and row["tokens"]["input"] > 0


def test_when_every_model_refuses_the_wave_restarts_from_a_fresh_context(tmp_path):
    api = FakeMessagesAPI([message(thinking(), tool_use(EDITOR, {"command": "view", "path": "c1/train.py"})),
                           refusal("frontier_llm"), _edit_and_submit()])
    searcher, ctx = build(api, run_baseline=False, fallback_models=[]), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    assert len(out) == 1
    assert len(api.requests[2]["messages"]) == 1, "the refused conversation is dropped"
    spent = re.compile(r"- money: .*\n")  # the refused call was paid for meanwhile
    assert spent.sub("", api.requests[2]["messages"][0]["content"][0]["text"]) == \
        spent.sub("", api.requests[0]["messages"][0]["content"][0]["text"])
    summary = searcher.summary()
    assert summary["agent_refusals"] == 1 and summary["agent_refusals_frontier_llm"] == 1
    wave = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert [r["category"] for r in wave["refusals"]] == ["frontier_llm"] and wave["outcome"] == "ok"
    assert "competing AI models" in wave["refusals"][0]["explanation"]


def test_waves_every_model_refuses_never_count_as_waves_without_ideas(tmp_path):
    api = FakeMessagesAPI([refusal("frontier_llm"), refusal(None), refusal("frontier_llm"), refusal("cyber")],
                          policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, max_refusals=1, fallback_models=[], max_failed_waves=1,
                          wave_backoff_s=CONF["wave_backoff_s"]), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert searcher.ask(1, ctx) == [] and searcher.ask(1, ctx) == [] and not searcher.done()
    assert len(searcher.ask(1, ctx)) == 1, "the next wave starts afresh"
    summary = searcher.summary()
    assert summary["agent_refusals"] == 4 and summary["agent_refusals_uncategorised"] == 1
    assert summary["agent_refused_waves"] == 2 and summary["agent_stop_reason"] == ""
    assert json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())["outcome"] == "refused"
    assert searcher.clock.slept == [CONF["wave_backoff_s"], 2 * CONF["wave_backoff_s"]], "backed off like an outage"


def test_a_hung_call_is_bounded_despite_the_sdks_retries(tmp_path):
    api = FakeMessagesAPI([Hang(30.0) for _ in range(7)], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, max_retries=6, timeout_s=0.3, max_call_s=1.0), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert searcher.ask(1, ctx) == []
    assert 2 <= len(api.requests) <= 3, "the SDK alone would make 7 attempts of 0.3 s"
    assert all(t is not None and t <= 0.3 for t in api.timeouts)
    wave = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert wave["outcome"] == "error" and "time limit" in wave["reason"]


def test_dropped_connections_and_timeouts_are_retried_by_the_sdk(tmp_path):
    api = FakeMessagesAPI([Drop(), Hang(30.0)], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, timeout_s=0.2), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    assert [h["x-stainless-retry-count"] for h in api.headers[:3]] == ["0", "1", "2"]


def test_long_turns_still_read_the_cache_and_the_ledger_pays_what_the_request_costs(tmp_path):
    """A turn of 24 tool calls adds 48 blocks, past the API's 20-block lookback: a single sliding
    breakpoint would miss the cache; the previous tail's breakpoint reads it."""
    views = [tool_use(EDITOR, {"command": "view", "path": "c1/train.py", "view_range": [i, i + 1]})
             for i in range(1, 25)]
    api = FakeMessagesAPI([message(thinking(), *views), message(thinking(), *views[:2]), _edit_and_submit()],
                          cache=True)
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    reads = [u["cache_read_input_tokens"] for u in api.usages()]
    assert reads[0] == 0 and all(r > 0 for r in reads[1:])
    first = api.usages()[0]
    assert reads[1] == first["cache_read_input_tokens"] + first["cache_creation_input_tokens"] + first["input_tokens"]
    one_breakpoint = json.loads(json.dumps(api.requests[1]))  # the request after the long turn, tail mark only
    for b in one_breakpoint["messages"][0]["content"]:
        b.pop("cache_control", None)
    replay = PromptCache()
    replay.usage(api.requests[0], 1)
    assert replay.usage(one_breakpoint, 1)["cache_read_input_tokens"] < reads[1]

    p = CONF["prices"][CONF["model"]]
    expected = sum(u["input_tokens"] * p["input"] + u["cache_creation"]["ephemeral_5m_input_tokens"] * p["cache_write_5m"]
                   + u["cache_creation"]["ephemeral_1h_input_tokens"] * p["cache_write_1h"]
                   + u["cache_read_input_tokens"] * p["cache_read"] + u["output_tokens"] * p["output"]
                   for u in api.usages()) / 1e6
    assert searcher.summary()["agent_usd_total"] == pytest.approx(expected)
    assert api.usages()[0]["cache_creation"]["ephemeral_1h_input_tokens"] > 0  # the system prompt, for an hour


def _request(**fields) -> dict:
    """A minimal request the fake accepts, with `fields` changed."""
    body = {"model": CONF["model"], "max_tokens": 1000,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    body.update(fields)
    return body


def test_the_strict_fake_refuses_what_the_api_refuses():
    from tests.fake_anthropic import Invalid, validate

    ok_user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    use = tool_use("read_results", {})
    issued = {use["id"]: {"[]"}, "turn": {"[]"}}  # as if the fake had returned `use` without thinking
    tool = {"name": "read_results", "input_schema": {"type": "object", "properties": {}}}
    cases = {
        "non-empty content": _request(messages=[ok_user, {"role": "assistant", "content": []}, ok_user]),
        "without `tool_result`": _request(messages=[ok_user, {"role": "assistant", "content": [use]}, ok_user]),
        "modified": _request(messages=[ok_user, {"role": "assistant", "content": [thinking("edited")]}, ok_user]),
        "passed back exactly": _request(messages=[ok_user, {"role": "assistant", "content": [thinking(), use]},
                                                  {"role": "user", "content": [{"type": "tool_result",
                                                                                "tool_use_id": use["id"], "content": "x"}]}]),
        "Extra inputs": _request(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "foo": 1}]}]),
        "non-whitespace text": _request(messages=[{"role": "user", "content": [{"type": "text", "text": " \n "}]}]),
        "thinking.type.enabled": _request(thinking={"type": "enabled", "budget_tokens": 2000}),
        "thinking.type.disabled": _request(thinking={"type": "disabled"}),
        "forces tool use": _request(tools=[tool], tool_choice={"type": "any"}),
        "maximum allowed number of output tokens": _request(max_tokens=200_000),
        "effort": _request(output_config={"effort": "xhigh"}, model="claude-sonnet-5-5"),
        "model: claude-opus-9": _request(model="claude-opus-9"),
        "should match pattern": _request(tools=[{**tool, "name": "read results"}]),
        "input_schema.type": _request(tools=[{**tool, "input_schema": {"type": "array"}}]),
        "must be unique": _request(tools=[tool, tool]),
        "requires the anthropic-beta header": _request(fallback_credit_token={"token": "fct_1", "mode": "best_effort"}),
        "maximum of 4": _request(messages=[{"role": "user", "content": [
            {"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}} for i in range(5)]}]),
        "must not come after": _request(system=[{"type": "text", "text": "s", "cache_control": {"type": "ephemeral",
                                                                                            "ttl": "1h"}}],
                                        messages=[{"role": "user", "content": [
                                            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                                            {"type": "text", "text": "b", "cache_control": {"type": "ephemeral",
                                                                                            "ttl": "1h"}}]}]),
        "betas: Extra inputs": _request(betas=[]),
    }
    for words, body in cases.items():
        with pytest.raises(Invalid, match=re.escape(words)) as e:
            validate(body, issued=issued)
        assert e.value.status == (404 if words.startswith("model:") else 400), words
    with pytest.raises(Invalid, match="malformed or unknown token"):
        validate(_request(fallback_credit_token={"token": "fct_never_minted"}), issued,
                 betas={"fallback-credit-2026-07-01"}, minted={})


def test_the_strict_fake_accepts_what_the_api_accepts():
    """Text blocks of a returned turn may be changed or dropped; only thinking comes back verbatim."""
    from tests.fake_anthropic import validate

    thought, use = thinking("plan"), tool_use("read_results", {})
    issued = {use["id"]: {json.dumps([thought], sort_keys=True, separators=(",", ":"))}}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "x"}]}
    ok_user = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    for turn in ([thought, text("I will read the results."), use], [thought, use], [thought, text("reworded"), use]):
        validate(_request(messages=[ok_user, {"role": "assistant", "content": turn}, result]), issued)
    validate(_request(thinking={"type": "adaptive", "display": "summarized"}, output_config={"effort": "max"}), {})
    validate(_request(model="claude-opus-4-8", thinking={"type": "disabled"}, tool_choice={"type": "any"},
                      tools=[{"name": "t", "input_schema": {"type": "object"}}]), {})


def test_the_fake_sends_the_apis_retry_after_and_rate_limit_headers():
    status, body, headers = rate_limited(retry_after=17)
    assert status == 429 and headers["retry-after"] == "17" and "retry-after-ms" not in headers
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", headers["anthropic-ratelimit-requests-reset"])
    status, body, headers = overloaded()
    assert status == 529 and "retry-after" not in headers and body["error"]["type"] == "overloaded_error"


def test_the_strictness_fixture_is_shared_by_every_module_that_drives_the_fake():
    import tests.test_hybrid as hybrid

    assert strict_fake is hybrid.strict_fake is fake_anthropic.strict_fake
    rejected = FakeMessagesAPI()
    rejected.rejected.append("thinking blocks must be passed back exactly")
    assert rejected.unexpected() and rejected in fake_anthropic.LIVE
    rejected.expect_rejection("passed back exactly")  # announced: the fixture lets it pass
    assert rejected.unexpected() == []


# -- API errors --------------------------------------------------------------------------------------
def test_429_and_529_are_retried_by_the_sdk(tmp_path):
    api = FakeMessagesAPI([rate_limited(), overloaded()], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(1, ctx)
    assert len(out) == 1 and not searcher.done()
    assert [h["x-stainless-retry-count"] for h in api.headers[:3]] == ["0", "1", "2"]
    assert searcher.summary()["agent_calls"] == 3  # only answered calls cost money
    assert searcher.summary()["agent_api_retries"] == 2


@pytest.mark.parametrize("error, requests, words", [
    (spend_limit, 3, "enforced_spend_limit_reached"),  # a 429: the SDK retries it like any rate limit
    (credit_too_low, 1, "credit balance is too low"),
    (bad_key, 1, "AuthenticationError 401"),
])
def test_errors_no_retry_can_fix_end_the_searcher_cleanly(tmp_path, error, requests, words):
    api = FakeMessagesAPI([error() for _ in range(3)])
    searcher, ctx = build(api), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(2, ctx)
    assert [c.meta["role"] for c in out] == ["baseline"]  # costs no API call, still runs
    assert searcher.done() and words in searcher.summary()["agent_stop_reason"]
    assert len(api.requests) == requests
    assert searcher.ask(2, ctx) == [] and len(api.requests) == requests
    wave = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert wave["outcome"] == "stopped" and words in wave["reason"]
    finish(searcher, started(ctx, searcher, out[0], 0), 2.0)  # results are still told and kept
    assert searcher.board.best_id == "t0000"


def _overload_storm(minutes: float, clock: VirtualClock, then=None):
    """A policy: 529 for every request until `minutes` of the clock have passed, then `then`."""
    start = clock.monotonic()

    def answer(body):
        if clock.monotonic() - start < minutes * 60:
            return overloaded()
        return then(body)
    return answer


def test_a_20_minute_overload_storm_pauses_the_agent_but_never_ends_it(tmp_path, virtual_time):
    api = FakeMessagesAPI(policy=_overload_storm(20, virtual_time, KnobAgent("MATRIX_LR", [0.5])))
    searcher, ctx = build(api, run_baseline=False, max_failed_waves=2, wave_backoff_s=30), make_ctx(tmp_path)
    searcher.setup(ctx)
    waves = 0
    while not (out := searcher.ask(1, ctx)):
        waves += 1
        assert not searcher.done() and waves < 30, f"wave {waves}: {searcher.summary()['agent_stop_reason']}"
    assert len(out) == 1 and searcher.summary()["agent_stop_reason"] == ""
    assert waves >= 5, "the old rule (5 failed waves end the agent) would have stopped it"
    backoffs = [w for w in virtual_time.slept if w >= 30]
    assert backoffs[:5] == [30, 60, 120, 240, 300] and set(backoffs[5:]) <= {300}, "it backs off, at most 300 s"
    summary = searcher.summary()
    assert summary["agent_error_waves"] == waves and summary["agent_waves_skipped"] == waves
    assert json.loads((tmp_path / "study" / "agent" / "state.json").read_text())["failing_waves"] == 0, "the storm ended"


def test_an_hour_of_nothing_but_errors_stops_the_agent_and_says_why(tmp_path, virtual_time):
    api = FakeMessagesAPI(policy=lambda body: rate_limited(retry_after=5))
    searcher, ctx = build(api, run_baseline=False, wave_backoff_s=30, give_up_after_s=3600), make_ctx(tmp_path)
    searcher.setup(ctx)
    started = virtual_time.monotonic()
    for _ in range(40):
        if searcher.done():
            break
        assert searcher.ask(1, ctx) == []
    assert searcher.done() and virtual_time.monotonic() - started >= 3600
    reason = searcher.summary()["agent_stop_reason"]
    assert reason.startswith("the API failed for 6") and "RateLimitError 429" in reason and "give_up_after_s=3600" in reason
    state = json.loads((tmp_path / "study" / "agent" / "state.json").read_text())
    assert state["stop_reason"] == reason


def test_a_resumed_study_continues_the_agents_state(tmp_path, virtual_time):
    ctx = make_ctx(tmp_path)
    first = build(FakeMessagesAPI(policy=lambda body: overloaded()), run_baseline=False, wave_backoff_s=30)
    first.setup(ctx)
    for _ in range(3):
        assert first.ask(1, ctx) == []
    assert not first.done()
    # a restart mid-storm: the streak (and its backoff) continues instead of starting over
    second = build(FakeMessagesAPI(policy=lambda body: overloaded()), run_baseline=False, wave_backoff_s=30)
    second.setup(ctx)
    assert (second.failing_waves, second.failing_for_s) == (first.failing_waves, pytest.approx(first.failing_for_s))
    slept = len(virtual_time.slept)
    assert second.ask(1, ctx) == [] and virtual_time.slept[slept] == 120, "the fourth failed wave waits 120 s"
    second.stop("API: AuthenticationError 401: invalid x-api-key")
    # a stopped agent stays stopped across a resume, and says so; revive starts it again
    third = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5])), run_baseline=False)
    third.setup(ctx)
    assert third.done() and third.summary()["agent_stop_reason"] == second.stop_reason and third.ask(1, ctx) == []
    fourth = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5])), run_baseline=False, revive=True)
    fourth.setup(ctx)
    assert not fourth.done() and fourth.failing_waves == 0 and len(fourth.ask(1, ctx)) == 1


# -- deadlines ----------------------------------------------------------------------------------------
def test_a_retry_after_past_the_deadline_raises_at_once_naming_the_status(tmp_path, virtual_time):
    api = FakeMessagesAPI([rate_limited(retry_after=60)], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, max_call_s=10.0), make_ctx(tmp_path)
    searcher.setup(ctx)
    before = virtual_time.monotonic()
    assert searcher.ask(1, ctx) == []
    assert virtual_time.monotonic() - before < 5, "the SDK did not sleep the 60 s the API asked for"
    assert len(api.requests) == 1, "and sent no retry"
    wave = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())
    assert wave["outcome"] == "error" and wave["reason"].startswith("CallTimeLimit: 429 rate_limit_error")
    assert "retry after 60 s" in wave["reason"] and not searcher.done()
    assert len(searcher.ask(1, ctx)) == 1, "the next wave goes on"


def test_a_retry_after_within_the_deadline_is_waited_for(tmp_path, virtual_time):
    api = FakeMessagesAPI([rate_limited(retry_after=7)], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, max_call_s=10.0), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    assert 7.0 in virtual_time.slept and searcher.summary()["agent_api_retries"] == 1


# -- the ledger -----------------------------------------------------------------------------------------
def test_regional_inference_is_priced_at_its_multiplier(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5]), inference_geo="us")  # the workspace's default
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    p = CONF["prices"][CONF["model"]]
    expected = sum(_price(u, p, 1.1) for u in api.usages())
    assert searcher.summary()["agent_usd_total"] == pytest.approx(expected)
    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()]
    assert {r["inference_geo"] for r in rows} == {"us"}
    global_api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5]))
    other = build(global_api, run_baseline=False, inference_geo="global")
    other.setup(make_ctx(tmp_path / "global"))
    assert len(other.ask(1, make_ctx(tmp_path / "global"))) == 1 and global_api.requests[0]["inference_geo"] == "global"
    assert other.summary()["agent_usd_total"] == pytest.approx(sum(_price(u, p) for u in global_api.usages()))


def test_an_answer_is_priced_at_the_row_of_the_model_that_gave_it_even_under_a_dated_id(tmp_path):
    from searchers.claude_cost import Ledger, PriceBook

    book = PriceBook(CONF["prices"], [CONF["model"], "claude-opus-4-8"], CONF["regional_multiplier"])
    ledger = Ledger(tmp_path / "costs.jsonl", book)
    u = fake_anthropic.usage(input_tokens=1000, cache_read=5000, output_tokens=300, inference_geo="us")
    _, usd, row = ledger.record(u, model="claude-opus-4-8-20260528", wave=1, turn=1)
    assert usd == pytest.approx(_price(u, CONF["prices"]["claude-opus-4-8"], 1.1))
    _, usd, _ = ledger.record(u, model="claude-unlisted", wave=1, turn=2)  # a model it does not know: the requested one's
    assert usd == pytest.approx(_price(u, CONF["prices"][CONF["model"]], 1.1))
    assert Ledger(tmp_path / "costs.jsonl", book).usd == pytest.approx(ledger.usd), "a resume reloads the total"


def test_a_call_cut_by_a_timeout_after_it_went_out_is_priced_as_an_estimate(tmp_path):
    api = FakeMessagesAPI([Hang(30.0), Drop()], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, timeout_s=0.3), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()]
    cut = [r for r in rows if r.get("estimated")]
    assert len(cut) == 1, "the hung call (sent, never answered) is estimated; the dropped connection never went out"
    assert cut[0]["usd"] > 0 and cut[0]["tokens"]["input"] > 1000 and "read timeout" in cut[0]["note"]
    summary = searcher.summary()
    assert summary["agent_estimated_calls"] == 1
    assert summary["agent_usd_total"] == pytest.approx(sum(r["usd"] for r in rows))


def test_a_model_that_submits_nothing_is_reminded_then_the_wave_is_skipped(tmp_path):
    api = FakeMessagesAPI([message(thinking(), text(f"Idea {i}: try a wider MLP.")) for i in range(3)])
    searcher, ctx = build(api, run_baseline=False, max_nudges=2), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert searcher.ask(2, ctx) == [] and not searcher.done()
    assert len(api.requests) == 3
    for req in api.requests[1:]:
        assert "No candidate has been submitted yet" in req["messages"][-1]["content"][-1]["text"]
    assert searcher.summary()["agent_waves_skipped"] == 1
    assert "no usable candidate" in json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())["reason"]


def test_max_usd_stops_the_agent_cleanly(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api, run_baseline=False, max_usd=0.01), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert searcher.ask(1, ctx) == []
    assert len(api.requests) == 1 and searcher.done() and "max_usd=0.01" in searcher.summary()["agent_stop_reason"]
    # a resumed study remembers what was spent
    again = build(FakeMessagesAPI(), run_baseline=False, max_usd=0.01)
    again.setup(ctx)
    assert again.done() and again.summary()["agent_usd_total"] == searcher.summary()["agent_usd_total"] > 0.01


# -- memory, resume, secrets -----------------------------------------------------------------------------
def test_each_wave_starts_from_a_compact_state_that_does_not_grow(tmp_path):
    scores = [2.0 + 0.001 * math.sin(i) for i in range(250)]
    best10 = sorted(range(250), key=scores.__getitem__)[:10]
    lr_line = baseline_line("MATRIX_LR")

    def first_prompt(n_trials: int) -> tuple[str, ClaudeSearcher]:
        api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5]))
        searcher, ctx = build(api, run_baseline=False, confirm_seeds=0), make_ctx(tmp_path / str(n_trials))
        searcher.setup(ctx)
        for i in range(n_trials):
            source = BASELINE.replace(lr_line, f"MATRIX_LR = {0.001 * (i + 1)!r}")
            cand = Candidate(source=source, hypothesis=f"idea number {i} " + "x" * 80)
            finish(searcher, started(ctx, searcher, cand, i), scores[i])
        searcher.ask(1, ctx)
        return api.requests[0]["messages"][0]["content"][0]["text"], searcher

    (small, _), (large, searcher) = first_prompt(40), first_prompt(250)
    elites = {int(e.trial_id[1:]) for e, _ in searcher.board.frontier()}
    forgotten = next(i for i in range(250) if i not in best10 and i not in elites)
    assert len(elites) <= 4
    assert "idea number 249 " in large and f"idea number {best10[0]} " in large
    assert f"idea number {forgotten} " not in large
    assert len(large) < 1.2 * len(small)


def test_a_resumed_searcher_keeps_spend_notes_and_wave_numbers(tmp_path):
    ctx = make_ctx(tmp_path)
    first = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5])))
    first.setup(ctx)
    base, cand = first.ask(2, ctx)
    trials = [started(ctx, first, base, 0), started(ctx, first, cand, 1)]
    for t, v in zip(trials, (2.0, 1.9)):
        finish(first, t, v)

    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.7]))
    second = build(api)
    second.setup(ctx)
    for t, v in zip(trials, (2.0, 1.9)):  # the loop replays the journal
        second.tell(t, Result(status="ok", val_bpb=v, device_kind="cpu"))
    assert second.summary()["agent_usd_total"] == pytest.approx(first.summary()["agent_usd_total"])
    out = second.ask(1, ctx)
    assert [c.meta["role"] for c in out] == ["agent"], "the baseline already ran"
    state = api.requests[0]["messages"][0]["content"][0]["text"]
    assert state.startswith("# Wave 2") and "wave 1: tried MATRIX_LR" in state and "Incumbent: t0001" in state
    assert out[0].parent == "t0001" and (tmp_path / "study" / "agent" / "wave_0002.json").exists()


def test_the_key_is_sent_to_the_api_but_never_written(tmp_path):
    api = FakeMessagesAPI([rate_limited()], policy=KnobAgent("MATRIX_LR", [0.5]))
    searcher, ctx = build(api), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.ask(2, ctx)
    searcher.client = build(FakeMessagesAPI([credit_too_low()])).client
    searcher.ask(1, ctx)
    assert len(out) == 2 and searcher.done()
    assert any(KEY in v for h in api.headers for v in h.values()), "the key must reach the API"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


# -- end to end -------------------------------------------------------------------------------------------
def test_two_waves_end_to_end_with_real_training(tmp_path, monkeypatch):
    """`run_study` with the claude searcher on the local launcher, 2 CPU slots, real tiny training."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from mlflow.tracking import MlflowClient

    from study.journal import JournalState
    from study.runner import run_study

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "searcher=claude", "objective=tiny", "~space", "progress=false", "launcher.slots=2", "study.max_trials=4",
            "searcher.confirm_seeds=0", "searcher.noise_seeds=1", "searcher.queue_depth=0", f"study.dir={tmp_path}/study", f"mlflow.tracking_uri={uri}"])
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 2.0, 0.8, 1.25], dump_env_in_wave=2))
    searcher = instantiate(cfg.searcher, http_client=api.client(), max_retries=2, _convert_="all")
    state = run_study(cfg, searcher=searcher)

    study = tmp_path / "study"
    js = JournalState.load(study / "journal.jsonl")
    finished = js.finished()
    assert len(finished) == 4 and all(r.status == "ok" for _, r in finished), [r.error for _, r in finished]
    system = (study / "agent" / "system_prompt.md").read_text()
    assert "`cpu`: 2 slot(s), relative speed 1.0" in system and "8 optimizer steps" in system
    waves = [json.loads(l) for l in (study / "agent" / "waves.jsonl").read_text().splitlines()]
    assert len(waves) >= 2 and {w["outcome"] for w in waves} == {"ok"}
    roles = sorted(t.candidate.meta["role"] for t, _ in finished)
    assert roles == ["agent", "agent", "agent", "baseline"]

    # every agent trial ran the model's edit, and every result was told back and judged
    for trial, result in finished:
        source = (Path(trial.directory) / "train.py").read_text()
        if trial.candidate.meta["role"] == "agent":
            assert read_knobs(source)["MATRIX_LR"] != read_knobs(BASELINE)["MATRIX_LR"]
        run = searcher.board.runs[trial.trial_id]
        assert run.score == pytest.approx(result.val_bpb) and run.decision
    assert searcher.board.best_id is not None
    wave2 = json.loads((study / "agent" / "wave_0002.json").read_text())
    seen = wave2["messages"][0]["content"][0]["text"]
    first_agent = next(t for t, _ in finished if t.candidate.meta.get("agent_wave") == 1)
    assert first_agent.trial_id in seen and "t0000" in seen  # wave 2 saw wave 1's results

    # the agent's dollars reach MLflow per trial and per study, with the transcripts as artifacts
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.study.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("arena.kind") == "study")
    children = [r for r in runs if r.data.tags.get("arena.kind") == "trial"]
    total = searcher.summary()["agent_usd_total"]
    assert parent.data.metrics["agent_usd_total"] == pytest.approx(total) and total > 0
    not_run = searcher.summary()["agent_usd_not_run"]  # the model kept thinking while the last trials ran
    assert sum(r.data.metrics.get("agent_usd", 0) for r in children) + not_run == pytest.approx(total)
    assert sorted(r.data.tags["role"] for r in children) == roles  # analysis.spend splits slot-hours by it
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "agent")}
    assert "agent/wave_0001.json" in artifacts and "agent/costs.jsonl" in artifacts

    # the key reached no trial (a candidate printed its environment into its log) and no file
    dumped = [t for t, _ in finished if ENV_DUMP in (Path(t.directory) / "train.py").read_text()]
    assert len(dumped) == 1 and os.environ["ANTHROPIC_API_KEY"] == KEY
    log = (Path(dumped[0].directory) / LOG_FILE).read_text()
    assert "TRIAL_ENV" in log and "'PATH'" in log and "ANTHROPIC" not in log
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert state.best is not None


# -- the frontier's tools ------------------------------------------------------------------------------
def _study_with(tmp_path, runs: list[tuple[dict, float]], api: FakeMessagesAPI, kinds=None, budget_kind="steps",
                **overrides):
    """A searcher that has seen the baseline (2.000) and `runs` (knob changes, val_bpb) finish."""
    searcher, ctx = build(api, run_baseline=True, confirm_seeds=0, **overrides), make_ctx(tmp_path, budget_kind, kinds)
    searcher.setup(ctx)
    kind = sorted(ctx.device_kinds)[0]
    finish(searcher, started(ctx, searcher, Candidate(source=BASELINE, seed=0, meta={"role": "baseline"}), 0, kind), 2.0)
    for i, (knobs, v) in enumerate(runs, start=1):
        cand = Candidate(source=write_knobs(BASELINE, knobs), knobs=knobs, hypothesis=f"set {knobs}")
        finish(searcher, started(ctx, searcher, cand, i, kind), v)
    return searcher, ctx


def test_combine_merges_two_elites_and_a_conflict_must_be_resolved(tmp_path):
    api = FakeMessagesAPI([
        message(thinking(), tool_use("combine", {"candidate": "c1", "first": "t0001", "second": "t0002"}),
                tool_use("combine", {"candidate": "c2", "first": "t0001", "second": "t0003"}),
                tool_use("submit_candidate", {"candidate": "c2", "hypothesis": "both LRs?"})),
        message(tool_use("submit_candidate", {"candidate": "c1", "hypothesis": "lower LR and less decay together"}),
                tool_use("start_from", {"candidate": "c2", "trial_id": "t0003"}),
                tool_use(EDITOR, {"command": "str_replace", "path": "c2/train.py", "old_str": "MATRIX_LR = 0.05",
                                  "new_str": "MATRIX_LR = 0.06"}),
                tool_use("submit_candidate", {"candidate": "c2", "hypothesis": "LR 0.06"})),
    ])
    searcher, ctx = _study_with(tmp_path, [({"MATRIX_LR": 0.03}, 1.996), ({"WEIGHT_DECAY": 0.1}, 1.997),
                                           ({"MATRIX_LR": 0.05}, 1.998)], api)
    assert {e.trial_id for e, _ in searcher.board.frontier()} >= {"t0001", "t0002"}
    out = searcher.ask(2, ctx)
    first, second = tool_results(api.requests[1])[:2]
    assert "cleanly" in first["content"] and "ancestor baseline" in first["content"]
    assert "1 conflict(s)" in second["content"]
    conflict = tool_results(api.requests[1])[2]
    assert conflict["is_error"] and "does not compile" in conflict["content"]
    merged = out[0]
    assert read_knobs(merged.source) == {**read_knobs(BASELINE), "MATRIX_LR": 0.03, "WEIGHT_DECAY": 0.1}
    assert merged.parent == "t0001" and merged.meta["combines"] == ["t0001", "t0002"]
    assert merged.knobs == {"WEIGHT_DECAY": 0.1}  # changed against its first parent
    assert out[1].knobs == {"MATRIX_LR": 0.06} and "combines" not in out[1].meta


def test_sweep_turns_one_idea_into_a_factorial_wave(tmp_path):
    base_wd = read_knobs(BASELINE)["WEIGHT_DECAY"]
    api = FakeMessagesAPI([
        message(tool_use("sweep", {"candidate": "c1", "hypothesis": "x", "knobs": {
            "MATRIX_LR": [0.01, 0.02, 0.03], "WEIGHT_DECAY": [0.1, 0.3]}})),
        message(tool_use("sweep", {"candidate": "c1", "hypothesis": "LR x decay", "knobs": {
            "MATRIX_LR": [0.03, 0.04], "WEIGHT_DECAY": [0.1, base_wd]}})),
        message(text("Those are my candidates.")),
    ])
    searcher, ctx = _study_with(tmp_path, [({"MATRIX_LR": 0.03}, 2.01)], api, max_sweep=4)
    out = searcher.ask(3, ctx)
    assert "6 combinations, over the limit of 4" in tool_results(api.requests[1])[0]["content"]
    grid = sorted((read_knobs(c.source)["MATRIX_LR"], read_knobs(c.source)["WEIGHT_DECAY"]) for c in out)
    # of the 4 combinations, (0.04, base) is the incumbent (the baseline) itself and (0.03, base) ran as t0001
    assert read_knobs(BASELINE)["MATRIX_LR"] == 0.04 and grid == [(0.03, 0.1), (0.04, 0.1)]
    reply = tool_results(api.requests[2])[0]["content"]
    assert "accepted 2 sweep candidate(s)" in reply and f"MATRIX_LR=0.03, WEIGHT_DECAY={base_wd!r}" in reply
    assert all("LR x decay [sweep MATRIX_LR=" in c.hypothesis for c in out)
    assert searcher.summary()["agent_tool_sweep"] == 2


def test_rerun_takes_a_trial_to_other_hardware_where_it_is_judged_against_that_kinds_baseline(tmp_path):
    kinds = {"H100": {"count": 2, "speed": 1.0}, "H200": {"count": 1, "speed": 1.08}}
    api = FakeMessagesAPI([
        message(tool_use("rerun", {"trial_id": "t0001", "device_kind": "H200", "seeds": 2}),
                tool_use("rerun", {"trial_id": "t0001", "device_kind": "TPU"}),
                tool_use("sweep", {"candidate": "c1", "knobs": {"WEIGHT_DECAY": [0.15]}, "hypothesis": "less decay"})),
    ])
    searcher, ctx = _study_with(tmp_path, [({"MATRIX_LR": 0.03}, 1.95)], api, kinds=kinds, budget_kind="seconds")
    assert searcher.board.best_id == "t0001"
    out = searcher.ask(2, ctx)  # the baseline's seed on H200 is due, then a wave that also queues re-runs
    assert [(c.meta["role"], c.device_kind) for c in out] == [("baseline", "H200"), ("agent", None)]
    reply = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())["messages"][-1]["content"]
    assert "queued 2 re-run(s) of t0001 on H200 (seeds [1, 2])" in reply[0]["content"]
    assert reply[1]["is_error"] and "not in this study's kinds" in reply[1]["content"]
    calls = len(api.requests)
    ready = searcher.ask(2, ctx)
    assert len(api.requests) == calls, "queued re-runs need no model call"
    assert sorted((c.meta["role"], c.device_kind, c.seed) for c in ready) == [("rerun", "H200", 1), ("rerun", "H200", 2)]
    finish(searcher, started(ctx, searcher, out[0], 10, "H200"), 1.90)  # the faster kind: baseline 1.90
    for i, c in enumerate(r for r in ready if r.meta["role"] == "rerun"):
        finish(searcher, started(ctx, searcher, c, 11 + i, "H200"), 1.86)
    elite = searcher.board.best_elite()
    assert elite.trial_id == "t0001" and [r.device_kind for r in elite.evidence] == ["H100", "H200", "H200"]
    # 0.05 better than the baseline on H100, 0.04 on H200: the H200's own speed earns nothing
    assert searcher.board.elite_score(elite) == pytest.approx((-0.05 - 0.04 - 0.04) / 3)
    table = searcher.board.table()
    assert "t0011\tok\t1.8600" in table and "re-run on H200" in table


def test_results_show_steps_speed_memory_and_reflections_that_survive_a_resume(tmp_path):
    api = FakeMessagesAPI([message(tool_use("reflect", {"trial_id": "t0001", "text": "lower LR   helps\nat this size"}),
                                   tool_use("reflect", {"trial_id": "t0099", "text": "x"}),
                                   tool_use("sweep", {"candidate": "c1", "knobs": {"MATRIX_LR": [0.02]},
                                                      "hypothesis": "lower still"}))])
    searcher, ctx = _study_with(tmp_path, [({"MATRIX_LR": 0.03}, 1.98)], api)
    trial = started(ctx, searcher, Candidate(source=write_knobs(BASELINE, {"MATRIX_LR": 0.05})), 2)
    searcher.tell(trial, Result(status="oom", error="CUDA out of memory", num_steps=3, tokens_per_second=5120.0,
                                peak_memory_mb=79000.0, device_kind="cpu"))
    searcher.ask(1, ctx)
    first = api.requests[0]["messages"][0]["content"][0]["text"]
    assert "## Finished trials without your reflection\nt0001" in first
    assert "t0002\toom\t-\t-\tcpu\t0\t3\t5120\t79000" in first  # steps, tokens/s, peak MB
    reply = json.loads((tmp_path / "study" / "agent" / "wave_0001.json").read_text())["messages"][-1]["content"]
    assert reply[1]["is_error"] and "no finished trial 't0099'" in reply[1]["content"]
    assert "lower LR helps at this size" in searcher.board.table()

    again = build(FakeMessagesAPI(), run_baseline=True, confirm_seeds=0)
    again.setup(ctx)
    for run in sorted(searcher.board.runs.values(), key=lambda r: r.index):  # the journal's replay
        t = Trial(trial_id=run.trial_id, index=run.index, objective=ctx.objective, directory=run.directory,
                  candidate=Candidate(source=run.source, meta={"role": run.role}))
        again.tell(t, Result(status=run.status, val_bpb=run.score if run.ok else None, device_kind="cpu"))
    assert again.board.runs["t0001"].reflection == "lower LR helps at this size"


def test_asks_hand_out_reruns_and_queued_candidates_while_the_model_thinks(tmp_path):
    """No slot waits for the model when something is ready: the model is held mid-wave (a gate)
    while confirmation re-runs and queued candidates go out at once."""
    gate = threading.Event()
    gate.set()
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.3]), gate=gate)
    searcher, ctx = build(api, background=True, noise_seeds=3, queue_depth=2, idle_wait_s=0.05), make_ctx(tmp_path)
    searcher.setup(ctx)
    first = searcher.ask(4, ctx)  # the baseline's 3 seeds at once; a wave for 1 + a queue of 2 starts
    assert [c.meta["role"] for c in first] == ["baseline"] * 3
    searcher._thinking.result(timeout=60)
    for i, (c, v) in enumerate(zip(first, (2.000, 2.001, 1.999))):
        finish(searcher, started(ctx, searcher, c, i), v)
    gate.clear()  # the model now thinks until the test says so
    out = searcher.ask(2, ctx)  # two of the 3 queued; the queue falls below its depth: a new wave starts
    assert [c.meta["role"] for c in out] == ["agent", "agent"] and searcher._thinking is not None
    cand = started(ctx, searcher, out[0], 3)
    finish(searcher, cand, 1.998)  # within noise: two fresh re-runs are due
    calls = len(api.requests)
    now = searcher.ask(4, ctx)
    assert len(api.requests) == calls and not searcher._thinking.done(), "the model is still thinking"
    assert sorted(c.meta["role"] for c in now) == ["agent", "confirm", "confirm"]
    assert searcher.ask(2, ctx) == [] and searcher.summary()["agent_idle_waits"] == 1  # nothing left: it waited
    gate.set()
    searcher._thinking.result(timeout=60)
    assert len(searcher.ask(8, ctx)) >= 1
    searcher.close()


# -- a whole study on the simulated clock ---------------------------------------------------------------
def test_a_simulated_study_on_8_slots_uses_the_frontier_and_survives_what_the_api_returns(tmp_path):
    api = FakeMessagesAPI([refusal("frontier_llm"), Hang(30.0), truncated(thinking(), tool_use(
        EDITOR, {"command": "create", "path": "c1/train.py", "file_text": "DEPTH = 1\n"})), empty_reply()],
        policy=PopulationAgent(), cache=True)
    # A keep margin of 6 sigma (not 2): which gains land inside it depends on how the waves and the
    # finishing trials interleave, and at 2 sigma about one study in six had none, so no confirmation.
    # The confirmations go ahead of the queue, so 56 trials (not 40) leave room for the late merges.
    searcher, finished, idle = simulated_study(tmp_path, api, trial_seconds=3.0, sleep=True,  # trials overlap thinking
                                               max_trials=56, noise_z=6.0)
    summary = searcher.summary()
    roles = [t.candidate.meta.get("role") for t, _ in finished]
    print(f"\n8 simulated slots, 56 trials: slot idle share {idle['all']:.1%} before the last submission, "
          f"{idle['after_first_wave']:.1%} after the first wave's candidates; asks that waited for the model "
          f"{summary['agent_idle_waits']} ({summary['agent_idle_wait_seconds']:.2f} s); waves {summary['agent_waves']}; "
          f"confirmation runs {roles.count('confirm')}")
    assert len(finished) == 56 and all(r.status == "ok" for _, r in finished), "no trial lost"
    assert summary["agent_refusals_frontier_llm"] == 1 and summary["agent_truncated_replies"] == 1
    assert summary["agent_empty_replies"] == 1
    assert summary["agent_api_retries"] == 1, "the hung call was retried, and counted"
    for tool in ("combine", "sweep", "rerun", "reflect"):
        assert summary[f"agent_tool_{tool}"] >= 1, tool
    assert {"baseline", "agent", "confirm"} <= set(roles)
    assert any(t.candidate.meta.get("reruns") for t, _ in finished), "the agent's re-run ran"
    assert any(t.candidate.meta.get("combines") for t, _ in finished), "a merged candidate ran"
    baselines = sorted((t for t, _ in finished if t.candidate.meta.get("role") == "baseline"), key=lambda t: t.index)
    assert [t.seed for t in baselines][:3] == [0, 1, 2]  # handed out in this order; they finish in any
    assert searcher.board.sigma(None) is not None and searcher.board.best_id is not None
    assert summary["agent_cache_read_tokens"] > 0


def test_a_scripted_8_slot_study_survives_a_bad_day_of_the_real_api(tmp_path, virtual_time):
    """A pure-agent study through a refusal storm on the requested model, a 20-minute storm of
    529s, a retry-after of an hour and a blank text block: every trial runs, the agent never stops."""
    searcher, finished, idle, api, researcher = fake_anthropic.scripted_study(tmp_path, virtual_time)
    summary = searcher.summary()
    waves = [json.loads(l) for l in (tmp_path / "study" / "agent" / "waves.jsonl").read_text().splitlines()]
    print(f"\nscripted 8-slot study, 56 trials: idle share {idle['after_first_wave']:.1%} after the first wave "
          f"({idle['all']:.1%} in all); API events {researcher.events}; waves {len(waves)} "
          f"({summary['agent_error_waves']} lost to errors); ${summary['agent_usd_total']:.2f}")
    assert len(finished) == 56 and all(r.status == "ok" for _, r in finished), "the study never ended early"
    assert summary["agent_stop_reason"] == "" and not searcher.done()
    agent_waves = {t.candidate.meta.get("agent_wave") for t, _ in finished if t.candidate.meta.get("role") == "agent"}
    # a refusal storm survived on the fallback model: every refused request was answered by it
    assert researcher.events["refusals"] >= 3 and summary["agent_fallback_answers"] == researcher.events["refusals"]
    assert {2, 3, 4} <= agent_waves, "the refused waves still produced candidates"
    # a 20-minute overload storm survived: more failed waves than the old rule allowed, and ideas after it
    storm = [w for w in waves if w["outcome"] == "error" and "529" in w["reason"]]
    assert len(storm) >= 5 and researcher.events["overloaded"] >= 3 * len(storm)
    assert max(agent_waves) > max(w["wave"] for w in storm), "the agent went on after the storm"
    # a retry-after of an hour raised at once instead of holding the wave
    long_wait = [w for w in waves if w["reason"].startswith("CallTimeLimit: 429")]
    assert len(long_wait) == 1 and "retry after 3600 s" in long_wait[0]["reason"]
    assert 3600 not in virtual_time.slept
    # the blank text block was dropped (the strict fake refuses it), thinking went back untouched
    assert summary["agent_blank_blocks_dropped"] == 1
    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "costs.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"claude-opus-5-5", "claude-opus-4-8"}
    assert sum(r["usd"] for r in rows) == pytest.approx(summary["agent_usd_total"])


def test_a_stored_noise_floor_sets_the_margin_before_any_baseline_seed(tmp_path):
    store = tmp_path / "noise_floor" / "tiny" / "cpu"
    store.mkdir(parents=True)
    (store / "0123abcd4567.json").write_text(json.dumps({"sigma": 0.004, "measured_at": "2026-12-01T00:00:00"}))
    searcher, ctx = build(FakeMessagesAPI(), noise_store=str(tmp_path / "noise_floor")), make_ctx(tmp_path)
    ctx.objective["preset"] = "tiny"
    searcher.setup(ctx)
    assert searcher.board.sigma("cpu") == 0.004
    assert searcher.board.margin("cpu") == pytest.approx(2 * 0.004 * math.sqrt(2))
    assert "sigma 0.0040 from stored noise floor" in searcher.board.noise_lines(["cpu"])[0]


def test_propose_is_one_wave_in_line_with_extra_context_for_other_searchers(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.7]))
    searcher, ctx = build(api, background=True), make_ctx(tmp_path)
    searcher.setup(ctx)
    out = searcher.propose(2, ctx, extra_context="## The sampler beside you\nIt likes MATRIX_LR near 0.02.")
    assert [c.meta["role"] for c in out] == ["agent", "agent"] and not searcher.queue
    state = api.requests[0]["messages"][0]["content"][0]["text"]
    assert "## The sampler beside you\nIt likes MATRIX_LR near 0.02.\n\n## This wave" in state


def test_a_candidate_lost_to_the_infrastructure_runs_again_at_no_second_cost(tmp_path):
    searcher, ctx = build(FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5])), run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    (cand,) = searcher.ask(1, ctx)
    assert cand.meta["agent_usd"] > 0
    finish(searcher, started(ctx, searcher, cand, 0), None, status="lost")
    (again,) = searcher.ask(1, ctx)
    assert again.source == cand.source and again.meta["agent_usd"] == 0 and again.meta["requeued"] == "t0000"
    assert again.meta["agent_output_tokens"] == 0


def test_queued_candidates_survive_a_restart_unless_the_journal_shows_they_ran(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.6, 0.7]))
    first, ctx = build(api, run_baseline=False, background=True, queue_depth=2, idle_wait_s=60), make_ctx(tmp_path)
    first.setup(ctx)
    (handed,) = first.ask(1, ctx)  # nothing was ready: it waited for the first candidate of a wave of 1 + 2
    if first._thinking is not None:  # the rest of the wave lands in the queue
        first._thinking.result(timeout=60)
        first._collect_wave()
    assert len(first.queue) == 2 and first._thinking is None
    ran = started(ctx, first, first.ask(1, ctx)[0], 0)  # one queued candidate ran; a wave refills the queue
    first._thinking.result(timeout=60)  # (its candidates were paid for: they are queued too)
    first.close()  # the study then died
    left = [c.source for c in first.queue]
    assert len(left) >= 2 and not {handed.source, ran.candidate.source} & set(left)
    queue_file = tmp_path / "study" / "agent" / "queue.jsonl"
    # as if it died before the queue was saved without the one it handed out
    queue_file.write_text(json.dumps(ran.candidate.to_dict()) + "\n" + queue_file.read_text())

    again = build(FakeMessagesAPI(), run_baseline=False, background=True, queue_depth=2)
    again.setup(ctx)
    assert [c.source for c in again.queue] == [ran.candidate.source, *left]
    again.tell(ran, Result(status="ok", val_bpb=2.0, device_kind="cpu"))  # the journal's replay
    assert [c.source for c in again.queue] == left, "what ran is not run again; the rest is kept in order"


# -- a researcher that knows its budget and reads its evidence -------------------------------------------
def _history(ctx: SearchContext, n: int, seconds: float = 240.0) -> None:
    """`n` finished trials, one submitted every `seconds` of study time, each running a minute."""
    trials = []
    for i in range(n):
        t = Trial(trial_id=f"t{i:04d}", index=i, candidate=Candidate(source=BASELINE), objective=ctx.objective,
                  submitted_at=i * seconds)
        trials.append((t, Result(status="ok", val_bpb=2.0, started_at=1000 + i * seconds,
                                 finished_at=1060 + i * seconds, queue_seconds=0.0)))
    ctx.history = trials


def test_each_wave_says_the_trials_hours_and_dollars_left_and_plans_for_them(tmp_path):
    api = FakeMessagesAPI(policy=KnobAgent("MATRIX_LR", [0.5, 0.6]))
    searcher, ctx = build(api, run_baseline=False, study_max_trials=20, study_max_hours=1.0), make_ctx(tmp_path)
    searcher.setup(ctx)
    _history(ctx, 5)  # the last submitted at 960 s and ran 60 s: 0.28 h of the study's hour used
    ctx.in_flight = [Trial(trial_id="t0005", index=5, candidate=Candidate(source=BASELINE), objective=ctx.objective,
                           submitted_at=1000.0)]
    searcher.ask(1, ctx)
    state = fake_anthropic.state_text(api.requests[0])
    budget = state.split("## Budget left\n", 1)[1].split("\n\n", 1)[0]
    assert "- trials: 14 of 20 left (5 finished, 1 running, 0 queued here)" in budget
    assert "- time: about 0.72 h of 1 h left" in budget
    assert re.search(r"- money: \$20\.00 of \$20 left", budget)
    assert "Phase: Early" in budget and "explore" in budget  # 6 of 20 trials and 0.28 h of 1 h: under a third
    _history(ctx, 15)
    ctx.in_flight = []
    searcher.ask(1, ctx)
    later = fake_anthropic.state_text(api.requests[3]).split("## Budget left\n", 1)[1].split("\n\n", 1)[0]
    assert "- trials: 5 of 20 left" in later and "Phase: Late" in later and "confirm" in later
    assert re.search(r"about \d+ more waves at the recent rate", later)


def test_the_analysis_tool_reads_knob_effects_interactions_edits_and_queries(tmp_path):
    base_wd = read_knobs(BASELINE)["WEIGHT_DECAY"]
    asks = [{"by": "knob", "knob": "MATRIX_LR"}, {"by": "pair", "knobs": ["MATRIX_LR", "WEIGHT_DECAY"]},
            {"by": "edit"}, {"by": "runs", "idea": "weight_decay"}, {"by": "kind"}, {"by": "parent"},
            {"by": "pair", "knobs": ["MATRIX_LR"]}]
    api = FakeMessagesAPI([message(*[tool_use("analyze", a) for a in asks]), message(text("Noted."))])
    searcher, ctx = _study_with(tmp_path, [({"MATRIX_LR": 0.03}, 1.98), ({"WEIGHT_DECAY": 0.1}, 1.99),
                                           ({"MATRIX_LR": 0.03, "WEIGHT_DECAY": 0.1}, 1.95)], api)
    child = Candidate(source=write_knobs(BASELINE, {"MATRIX_LR": 0.025}) + "\n_extra_norm = True\n", parent="t0001",
                      hypothesis="a code edit and a lower LR on top of t0001")
    finish(searcher, started(ctx, searcher, child, 4), 1.97)
    searcher.ask(1, ctx)
    knob, pair, edit, runs, kind, parent, bad = (r["content"] for r in tool_results(api.requests[1]))
    # MATRIX_LR 0.03 in t0001 (-0.02) and t0003 (-0.05); the baseline's 0.04 in t0000 (0) and t0002 (-0.01)
    assert "MATRIX_LR\t0.03\t2\t-0.0350\t" in knob and knob.splitlines()[1].endswith("\tbetter")
    assert "MATRIX_LR\t0.04 (baseline)\t2\t-0.0050\t" in knob and "MATRIX_LR\t0.025\t1\t-0.0300" in knob
    # both changes together: -0.05 observed, -0.03 predicted from each alone: an interaction of -0.02
    assert f"0.03\t{base_wd}\t1\t-0.0200" in pair and "0.03\t0.1\t1\t-0.0500\t" in pair
    assert pair.splitlines()[1].endswith("\t-0.0200"), pair
    assert edit.splitlines()[1].startswith("code edit + knob MATRIX_LR\t1\t-0.0100\t") and edit.endswith("\t1/1")
    assert [line.split("\t")[0] for line in runs.splitlines()[1:]] == ["t0003", "t0002"]
    assert kind.splitlines()[1].startswith("cpu\t5\t") and kind.splitlines()[1].endswith("\t2.0000")
    assert "t0001\t1\t-0.0300\t" in parent
    assert "pair needs knobs" in bad and tool_results(api.requests[1])[-1]["is_error"]
    assert searcher.summary()["agent_tool_analyze"] == 7


def test_the_frontier_counts_each_elites_children_and_keeps_room_for_a_different_idea():
    b = _board(confirm_seeds=0, diverse_elites=1)
    lr = write_knobs(BASELINE, {"MATRIX_LR": 0.03})
    _run(b, "t0000", BASELINE, 2.000)
    _run(b, "t0001", lr, 1.970)  # kept
    for tid, source, val in (("t0002", write_knobs(lr, {"WEIGHT_DECAY": 0.1}), 1.965),  # child, within noise: elite
                             ("t0003", write_knobs(lr, {"WEIGHT_DECAY": 0.3}), 2.050)):  # child, discarded
        b.record(Trial(trial_id=tid, index=int(tid[1:]), objective={}, seed=0, device_kind="cpu",
                       candidate=Candidate(source=source, parent="t0001", seed=0)),
                 Result(status="ok", val_bpb=val, device_kind="cpu"))
    _run(b, "t0004", write_knobs(BASELINE, {"MATRIX_LR": 0.031}), 1.985)  # worse by 0.015, the same idea: out
    _run(b, "t0005", BASELINE + "\n_extra_norm = True\n", 1.985)  # worse by 0.015, a code edit: a diverse elite
    _run(b, "t0006", BASELINE + "\n_other_edit = True\n", 1.984)  # a code edit again: the diverse place is taken
    assert b.runs["t0004"].decision.startswith("discarded") and b.runs["t0006"].decision.startswith("discarded")
    assert b.runs["t0005"].decision.startswith("diverse elite: -0.0150") and "code edit" in b.runs["t0005"].decision
    lines = "\n".join(b.frontier_lines())
    assert "t0001 (incumbent): -0.0300 vs baseline over 1 run(s) on cpu; children tried 2, improved on it 1" in lines
    assert "t0005 (diverse elite)" in lines
    _run(b, "t0007", write_knobs(BASELINE, {"MATRIX_LR": 0.02}), 1.90)  # a clear win: far ahead of everyone
    assert [e.trial_id for e, _ in b.frontier()] == ["t0007"], "the diverse elite goes once it is far behind"


def _screening_study(tmp_path, api, **overrides):
    kinds = {"slow": {"count": 2, "speed": 1.0}, "fast": {"count": 1, "speed": 2.0}}
    searcher, ctx = build(api, confirm_seeds=0, **overrides), make_ctx(tmp_path, "seconds", kinds)
    searcher.setup(ctx)
    return searcher, ctx


def _screened(*values: float) -> tuple:
    uses = []
    for i, v in enumerate(values, start=1):
        uses += [tool_use(EDITOR, {"command": "str_replace", "path": f"c{i}/train.py",
                                   "old_str": baseline_line("MATRIX_LR"), "new_str": f"MATRIX_LR = {v}"}),
                 tool_use("submit_candidate", {"candidate": f"c{i}", "hypothesis": f"LR {v}", "screen": True})]
    return message(thinking(), *uses)


def test_screened_candidates_the_keep_rule_likes_are_promoted_to_the_faster_kind_without_a_model_call(tmp_path):
    api = FakeMessagesAPI([_screened(0.03, 0.02, 0.05)])
    searcher, ctx = _screening_study(tmp_path, api, promote_top=2, promote_seeds=1)
    out = searcher.ask(5, ctx)
    assert [(c.meta["role"], c.device_kind) for c in out] == [("baseline", "fast"), ("baseline", "slow")] + \
        [("agent", "slow")] * 3, "screened on the slower kind"
    tools = {t["name"]: t for t in api.requests[0]["tools"]}
    assert "screen" in tools["submit_candidate"]["input_schema"]["properties"]
    assert "with `screen: true`: it runs on `slow`" in api.requests[0]["system"][0]["text"]
    finish(searcher, started(ctx, searcher, out[0], 0, "fast"), 1.90)
    finish(searcher, started(ctx, searcher, out[1], 1, "slow"), 2.00)
    for i, (cand, v) in enumerate(zip(out[2:], (1.975, 1.96, 2.01)), start=2):  # kept, kept (better), discarded
        finish(searcher, started(ctx, searcher, cand, i, "slow"), v)
    calls = len(api.requests)
    promoted = searcher.ask(2, ctx)
    assert len(api.requests) == calls, "promotions need no model call"
    assert sorted((c.parent, c.device_kind, c.meta["role"]) for c in promoted) == \
        [("t0002", "fast", "rerun"), ("t0003", "fast", "rerun")]
    assert all(c.meta["promotes"] == c.parent for c in promoted)
    for i, c in enumerate(promoted, start=5):
        finish(searcher, started(ctx, searcher, c, i, "fast"), 1.86)
    best = searcher.board.best_elite()
    assert best.trial_id == "t0003" and sorted(r.device_kind for r in best.evidence) == ["fast", "slow"]
    rows = [json.loads(l) for l in (tmp_path / "study" / "agent" / "promotions.jsonl").read_text().splitlines()]
    assert sorted(r["trial_id"] for r in rows) == ["t0002", "t0003"] and searcher.summary()["agent_promotions"] == 2

    again, _ = _screening_study(tmp_path, FakeMessagesAPI(), promote_top=2)  # a resume replays every result
    for tid in sorted(searcher.board.runs):
        run = searcher.board.runs[tid]
        trial = Trial(trial_id=tid, index=run.index, objective=ctx.objective, directory=run.directory, seed=run.seed,
                      device_kind=run.device_kind, candidate=Candidate(source=run.source, parent=run.parent,
                                                                       seed=run.seed, meta=dict(run.meta, role=run.role)))
        again.tell(trial, Result(status="ok", val_bpb=run.score, device_kind=run.device_kind))
    assert not [c for c in again.queue if c.meta.get("promotes")], "promotions are issued once, across a resume"


def test_screening_is_refused_with_one_kind(tmp_path):
    api = FakeMessagesAPI([_screened(0.03), _edit_and_submit()])
    searcher, ctx = build(api, run_baseline=False), make_ctx(tmp_path)
    searcher.setup(ctx)
    assert len(searcher.ask(1, ctx)) == 1
    refused = tool_results(api.requests[1])[1]
    assert refused["is_error"] and "screening needs two device kinds of different speeds" in refused["content"]
    assert "screen" not in {t["name"]: t for t in api.requests[0]["tools"]}["submit_candidate"]["input_schema"]["properties"]
    assert "nothing to screen on" in api.requests[0]["system"][0]["text"]
