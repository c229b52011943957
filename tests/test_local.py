"""The local launcher at its own interface: warm CPU slots (a `--serve` harness per slot that forks
each trial) and cold ones give the same results; a warm trial can be cancelled, adopted after a
restart, and survives its warm harness dying. Real tiny trials on this CPU."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from launchers.local import LocalLauncher, _is_our_harness
from study.records import Trial
from tests.conftest import make_trial, tiny_source

HANG_GUARD_S = 300


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
        trial = make_trial(tmp_path / f"warm-{warm}", 0, objective, tiny_source(objective))
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
    hook = ("import subprocess, time\n"
            f"open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid))\n"
            "time.sleep(600)")
    # sandbox none: the hook reports its child's pid through a file outside the scratch
    trial = make_trial(tmp_path / "study", 0, objective, tiny_source(objective, hook), sandbox="none")
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
    trial = make_trial(tmp_path / "study", 0, objective, tiny_source(objective))
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
    hook = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)"
    running = make_trial(tmp_path / "study", 0, objective, tiny_source(objective, hook), sandbox="none")  # the gate
    first.submit(running, first.slots()[0])
    wait_for(lambda: started_training(running), "the trial to start")
    first._procs.clear()  # as if the orchestrator died: nobody cancels anything
    first.close(cancel_running=False)
    pid = int((Path(running.directory) / "pid").read_text())
    assert _is_our_harness(pid, Path(running.directory))

    never_started = make_trial(tmp_path / "study", 1, objective, tiny_source(objective))
    second = LocalLauncher(slots=2)
    second.start()
    assert second.adopt(running, second.slots()[0])
    assert not second.adopt(never_started, second.slots()[1])
    gate.write_text("")
    result = collect(second, 1)[running.trial_id]
    second.close()
    assert result.status == "ok", result.error
    assert json.loads((Path(running.directory) / "result.json").read_text())["val_bpb"] == result.val_bpb
