"""The local launcher at its own interface: warm CPU slots (a `--serve` harness per slot that forks
each trial) and cold ones give the same results; a warm trial can be cancelled, adopted after a
restart, and survives its warm harness dying. Real tiny trials on this CPU."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launchers.local import LocalLauncher, _is_our_harness
from study.records import Candidate, Trial
from study.trialdir import write_trial_dir
from tests.conftest import ROOT

HANG_GUARD_S = 300


@pytest.fixture(scope="module")
def objective():
    from study.runner import check_objective, prepare_data

    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml"), resolve=True)
    knobs = conf["knobs"]
    o = check_objective(conf)
    prepare_data(o)
    o["knobs"] = knobs
    return o


def source(objective: dict, hook: str = "") -> str:
    from train.knobs import write_knobs

    text = write_knobs((ROOT / "train" / "train.py").read_text(), objective["knobs"])
    return text.replace("def train(model, run):\n", "def train(model, run):\n" + hook, 1)


def make_trial(study: Path, index: int, objective: dict, text: str, seed: int = 0) -> Trial:
    spec = {k: v for k, v in objective.items() if k != "knobs"}
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=Candidate(source=text), objective=spec, seed=seed)
    trial.directory = str(write_trial_dir(study / "trials" / trial.trial_id, trial))
    return trial


def collect(launcher: LocalLauncher, n: int) -> dict:
    results, deadline = {}, time.time() + HANG_GUARD_S
    while len(results) < n:
        assert time.time() < deadline, f"hung: {len(results)} of {n} results"
        results.update(launcher.wait(1.0))
    return results


def started_training(trial: Trial) -> bool:
    log = Path(trial.directory) / "run.log"
    return log.exists() and "worker:" in log.read_text()


def wait_for(predicate, what: str) -> None:
    deadline = time.time() + HANG_GUARD_S
    while not predicate():
        assert time.time() < deadline, f"hung waiting for {what}"
        time.sleep(0.1)


def test_warm_and_cold_slots_give_the_same_scores(tmp_path, objective):
    """The same candidate and seed on a warm slot and on a cold one: identical val_bpb and steps;
    the warm trial really was forked (its pid is not a child of this process)."""
    results = {}
    for warm in (True, False):
        launcher = LocalLauncher(slots=1, warm=warm)
        launcher.start()
        trial = make_trial(tmp_path / f"warm-{warm}", 0, objective, source(objective))
        launcher.submit(trial, launcher.slots()[0])
        forked = launcher._procs[trial.trial_id].popen is None
        results[warm] = collect(launcher, 1)[trial.trial_id]
        launcher.close()
        assert forked == warm
    assert results[True].status == results[False].status == "ok"
    assert (results[True].val_bpb, results[True].num_steps) == (results[False].val_bpb, results[False].num_steps)


def test_a_warm_trial_is_cancelled_with_everything_it_started(tmp_path, objective):
    launcher = LocalLauncher(slots=1)
    launcher.start()
    pid_file = tmp_path / "child.pid"
    hook = ("    import subprocess\n"
            f"    open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid))\n"
            "    __import__('time').sleep(600)\n")
    trial = make_trial(tmp_path / "study", 0, objective, source(objective, hook))
    launcher.submit(trial, launcher.slots()[0])
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), "train() to start its child")
    launcher.cancel(trial.trial_id)
    result = collect(launcher, 1)[trial.trial_id]
    launcher.close()
    assert result.status == "cancelled"
    child = int(pid_file.read_text())
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "\nState:\tZ" in Path(f"/proc/{child}/status").read_text(),
             "the grandchild to die")


def test_a_dead_warm_harness_costs_speed_not_trials(tmp_path, objective):
    launcher = LocalLauncher(slots=1)
    launcher.start()
    slot = launcher.slots()[0]
    server = launcher._servers[slot.name].process
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    trial = make_trial(tmp_path / "study", 0, objective, source(objective))
    launcher.submit(trial, slot)
    assert launcher._procs[trial.trial_id].popen is not None  # went cold
    assert slot.name not in launcher._servers
    result = collect(launcher, 1)[trial.trial_id]
    launcher.close()
    assert result.status == "ok", result.error


def test_a_restarted_launcher_adopts_a_warm_trial_still_running(tmp_path, objective):
    """After the orchestrator dies, its warm harnesses end (EOF) but their trials run on; a new
    launcher finds each one by its pid file and working directory."""
    first = LocalLauncher(slots=2)
    first.start()
    gate = tmp_path / "go"
    hook = f"    while not __import__('os').path.exists({str(gate)!r}): __import__('time').sleep(0.05)\n"
    running = make_trial(tmp_path / "study", 0, objective, source(objective, hook))
    first.submit(running, first.slots()[0])
    wait_for(lambda: started_training(running), "the trial to start")
    first._procs.clear()  # as if the orchestrator died: nobody cancels anything
    first.close(cancel_running=False)
    pid = int((Path(running.directory) / "pid").read_text())
    assert _is_our_harness(pid, Path(running.directory))

    never_started = make_trial(tmp_path / "study", 1, objective, source(objective))
    second = LocalLauncher(slots=2)
    second.start()
    assert second.adopt(running, second.slots()[0])
    assert not second.adopt(never_started, second.slots()[1])
    gate.write_text("")
    result = collect(second, 1)[running.trial_id]
    second.close()
    assert result.status == "ok", result.error
    assert json.loads((Path(running.directory) / "result.json").read_text())["val_bpb"] == result.val_bpb
