"""The SkyPilot launcher on SkyPilot's real Slurm backend, no cloud involved: the one-node Slurm on
127.0.0.1 (scripts/slurm_up.sh), reached through a loopback sshd as a throwaway user
(scripts/skypilot_local_up.sh), with the SkyPilot client in its own venv (scripts/skypilot_env.sh).

SkyPilot lives in .venv-sky only, so these tests drive it as a user would, through subprocesses:
`.venv-sky/bin/python run.py launcher=skypilot ...`, a few lines of its SDK, and Slurm's own commands.
They run under either venv. Without the setup above they skip, unless ARENA_REQUIRE_SKYPILOT=1 (CI)
makes that a failure; the first tests need none of it (config checks and the way files come back
in a job's log). What they cannot reach here: real clouds, Kubernetes, real H100/H200 placement.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launchers.skypilot import FILE_MARK, SkyPilotLauncher, _decode_files
from study.core import LauncherError
from tests.conftest import ROOT, sqlite_uri

SKY_VENV = Path(os.environ.get("ARENA_SKY_VENV", ROOT / ".venv-sky"))
SKY_PY = SKY_VENV / "bin" / "python"
SKY_LOCAL = Path(os.environ.get("SKY_LOCAL_ROOT", "/tmp/arena-skypilot"))
NODE_PY = SKY_LOCAL / "node-venv" / "bin" / "python"
SSH_USER = os.environ.get("SKY_LOCAL_USER", "arenasky")
MARK = "written by autoresearch-arena scripts/skypilot_local_up.sh"
STUDY_TIMEOUT_S = 1200  # a study that never ends fails the test instead of hanging CI


@pytest.fixture(scope="module")
def local_skypilot():
    """SkyPilot pointed at the local Slurm, or a skip (a failure under ARENA_REQUIRE_SKYPILOT)."""
    slurm_config = Path.home() / ".slurm" / "config"
    if not SKY_PY.exists():
        why = f"no SkyPilot client venv at {SKY_VENV}: run scripts/skypilot_env.sh"
    elif not os.environ.get("SLURM_CONF"):
        why = 'SLURM_CONF is unset: eval "$(scripts/slurm_up.sh)"'
    elif not (slurm_config.exists() and MARK in slurm_config.read_text() and NODE_PY.exists()):
        why = "SkyPilot is not pointed at the local Slurm: run scripts/skypilot_local_up.sh (as root)"
    else:
        proc = sky_sdk("from sky.client import sdk\nprint([str(c) for c in sky.get(sdk.enabled_clouds())])", timeout=300)
        why = None if proc.returncode == 0 and "slurm" in proc.stdout.lower() else (
            f"SkyPilot does not have the local Slurm enabled: {(proc.stdout + proc.stderr).strip()[-300:]}")
    if why:
        if os.environ.get("ARENA_REQUIRE_SKYPILOT"):
            pytest.fail(f"ARENA_REQUIRE_SKYPILOT is set but {why}", pytrace=False)
        pytest.skip(why)


def sky_sdk(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SKY_PY), "-c", f"import sky\n{code}"], capture_output=True, text=True,
                          timeout=timeout)


def sky_clusters(prefix: str) -> list[str]:
    proc = sky_sdk("print('\\n'.join(r['name'] for r in sky.get(sky.status(refresh=sky.StatusRefreshMode.FORCE))))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [n for n in proc.stdout.split() if n.startswith(prefix)]


def slurm_jobs(prefix: str) -> dict[str, str]:
    """The throwaway user's Slurm jobs (one per SkyPilot cluster) whose name starts with prefix: id -> name."""
    out = subprocess.run(["squeue", "-h", "-u", SSH_USER, "-o", "%i %j"], capture_output=True, text=True,
                         timeout=60).stdout
    return {i: n for i, n in (line.split(maxsplit=1) for line in out.splitlines() if line.strip())
            if n.startswith(prefix)}


def arena(workdir: Path, *overrides: str, **popen) -> subprocess.Popen:
    """`.venv-sky/bin/python run.py overrides...` in `workdir`, as a user would start it."""
    cmd = [str(SKY_PY), str(ROOT / "run.py"), "launcher=skypilot", "launcher.infra=slurm/arena", "launcher.cpus=1",
           "objective=tiny", "progress=false", f"mlflow.tracking_uri={sqlite_uri(workdir)}",
           f"study.dir={workdir}/study", f"hydra.run.dir={workdir}/outputs", *overrides]
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def journal(study_dir: Path) -> list[dict]:
    path = study_dir / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def test_bad_pool_settings_fail_with_one_line_before_anything_launches():
    for kwargs, message in [
        ({"accelerators": {"H100": 0}}, "accelerators must look like"),
        ({"accelerators": "H100:x"}, "accelerators must look like"),
        ({"infra": "aws", "cloud": "gcp"}, "either infra"),
        ({"region": "us-east-1"}, "needs a cloud"),
        ({"clusters": 2, "slots": 3}, "slots (3) must equal clusters (2)"),
        ({"clusters": 0}, "clusters must be >= 1"),
    ]:
        with pytest.raises(LauncherError, match=re.escape(message)):
            SkyPilotLauncher(**kwargs)
    assert SkyPilotLauncher(accelerators=["H100:1", "H200"]).accelerators == {"H100": 1, "H200": 1}
    assert SkyPilotLauncher(cloud="aws", region="us-east-1").infra == "aws/us-east-1"


def test_files_come_back_through_the_job_log_and_a_truncated_one_is_dropped():
    """What the trial's run command prints (gzip + base64 lines), as SkyPilot's log shows it:
    colored, each line prefixed with the task name and pid."""
    import base64
    import gzip

    result = json.dumps({"status": "ok", "val_bpb": 1.23}).encode()
    run_log = os.urandom(6000)  # incompressible: several lines, so dropping the last one truncates it
    lines = ["\x1b[36m(t0001, pid=4242)\x1b[0m training..."]
    for name, data in (("result.json", result), ("run.log", run_log)):
        encoded = base64.b64encode(gzip.compress(data)).decode()
        lines += [f"\x1b[36m(t0001, pid=4242)\x1b[0m {FILE_MARK} {name} {encoded[i:i + 2000]}"
                  for i in range(0, len(encoded), 2000)]
    assert _decode_files("\n".join(lines)) == {"result.json": result, "run.log": run_log}
    assert set(_decode_files("\n".join(lines[:-1]))) == {"result.json"}  # run.log cut short


def test_an_impossible_accelerator_fails_in_start_with_one_line(tmp_path, local_skypilot):
    proc = arena(tmp_path, "launcher.accelerators={H100:1,H200:1}", "launcher.cluster_prefix=nogpu",
                 "study.max_trials=1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "H100:1 or H200:1" in errors[0] and "ResourcesUnavailableError" in errors[0], errors[0]
    assert not slurm_jobs("nogpu-") and not sky_clusters("nogpu-")  # nothing was launched
    assert not (tmp_path / "study" / "trials").exists()


@pytest.mark.slow
def test_a_study_on_a_pool_of_two_clusters_survives_one_dying(tmp_path, local_skypilot):
    """2 clusters, 5 tiny trials; cluster 1's allocation is cancelled under a running trial (what a
    preemption or a dead node looks like): that trial is recorded `lost`, the cluster is relaunched
    and takes trials again, the study finishes, and the pool is gone at the end."""
    prefix = f"e2e{os.getpid() % 100000}"
    study_dir = tmp_path / "study"
    proc = arena(tmp_path, f"launcher.cluster_prefix={prefix}", "launcher.poll_interval_s=2",
                 f"launcher.python={NODE_PY}",
                 f"launcher.setup='cd ~/arena && {NODE_PY} -m train.prepare --corpus austen --vocab-size 512'",
                 "study.max_trials=5")
    victim, killed_trial = f"{prefix}-1", None
    try:
        deadline = time.time() + STUDY_TIMEOUT_S
        while proc.poll() is None and time.time() < deadline:
            if killed_trial is None:
                records = journal(study_dir)
                done = {r["trial_id"] for r in records if r["event"] == "finished"}
                on_victim = [r["trial"]["trial_id"] for r in records if r["event"] == "submitted"
                             and r["trial"]["slot"] == victim and r["trial"]["trial_id"] not in done]
                jobs = slurm_jobs(victim + "-")
                if on_victim and jobs:
                    subprocess.run(["scancel", *jobs], check=True, timeout=60)
                    killed_trial = on_victim[0]
            time.sleep(2)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    assert killed_trial is not None, "no trial ever ran on the second cluster"

    records = [r for r in journal(study_dir) if r["event"] == "finished"]
    finished = {r["trial_id"]: r["result"] for r in records}  # the last attempt of each trial
    assert len(finished) == 5, sorted(finished)
    # The killed attempt is journalled as lost (not a measurement) and the trial runs again.
    lost = next(r["result"] for r in records if r["trial_id"] == killed_trial)
    assert lost["status"] == "lost" and victim in lost["reason"], lost
    ok = {t: r for t, r in finished.items() if r["status"] == "ok"}
    assert len(ok) >= 3, finished
    for r in ok.values():
        assert math.isfinite(r["val_bpb"]) and r["slot"] in (f"{prefix}-0", victim) and r["device_kind"] == "cpu"
        assert r["extra"]["cluster"] == r["slot"] and r["host"] and r["extra"]["cluster_host"]
    submitted = [r["trial"] for r in journal(study_dir) if r["event"] == "submitted"]
    after = [t["trial_id"] for t in submitted[[t["trial_id"] for t in submitted].index(killed_trial) + 1:]]
    assert any(finished[t]["status"] == "ok" and finished[t]["slot"] == victim for t in after), finished

    # MLflow: one child run per trial, each with its cluster as the slot.
    import mlflow

    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("arena.kind") == "trial"]
    assert {r.data.tags["arena.trial_id"]: r.data.tags["slot"] for r in runs} == {
        t: r["slot"] for t, r in finished.items()}
    # One child per trial, with its last attempt's status (the lost attempt was not a measurement).
    assert {r.data.tags["arena.trial_id"]: r.data.tags["status"] for r in runs} == {
        t: r["status"] for t, r in finished.items()}

    # Each trial dir holds the task a person would rerun by hand.
    task = yaml.safe_load((study_dir / "trials" / killed_trial / "sky_task.yaml").read_text())
    assert "train.harness" in task["run"] and task["workdir"].endswith("sky_workdir")
    assert "train.prepare" in task["setup"] and any("~/arena/train" in k for k in task["file_mounts"])

    # The pool is gone: no SkyPilot cluster, no Slurm allocation.
    assert not slurm_jobs(prefix + "-") and not sky_clusters(prefix + "-")
