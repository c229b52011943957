"""Shared fixtures: run the real `python run.py` in a scratch folder, and a real MLflow server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["objective=tiny", "progress=false"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a minute")


@pytest.fixture(scope="module")
def objective():
    """The tiny objective, its data prepared once, as the study runner would: what launcher tests
    hand to trials they submit themselves."""
    from omegaconf import OmegaConf

    from study.runner import check_objective, prepare_data

    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "objective" / "tiny.yaml"), resolve=True)
    knobs = conf["knobs"]
    o = check_objective(conf)
    prepare_data(o)
    o["knobs"] = knobs
    return o


def tiny_source(objective: dict, hook: str = "") -> str:
    """train.py with the tiny knobs; `hook` runs at the start of train() in the trial's worker."""
    from train.knobs import write_knobs

    source = write_knobs((ROOT / "train" / "train.py").read_text(), objective["knobs"])
    if hook:
        source = source.replace("def train(model, run):\n", "def train(model, run):\n    _test_hook()\n", 1)
        source += "\n\ndef _test_hook():\n" + "".join(f"    {line}\n" for line in hook.splitlines())
    return source


def make_trial(study_dir: Path, index: int, objective: dict, source: str, **overrides):
    """Trial `index` (its seed too) of a study in `study_dir`, its directory written."""
    from study.records import Candidate, Trial
    from study.trialdir import write_trial_dir

    spec = {k: v for k, v in objective.items() if k != "knobs"}
    spec.update(overrides)
    trial = Trial(trial_id=f"t{index:04d}", index=index, candidate=Candidate(source=source), objective=spec,
                  seed=index)
    trial.directory = str(write_trial_dir(study_dir / "trials" / trial.trial_id, trial))
    return trial


def run_arena(workdir: Path, *overrides: str, timeout: float = 300, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run.py overrides...` in `workdir`, as a user would type it."""
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={workdir}/outputs/run",
           f"hydra.sweep.dir={workdir}/multirun"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sqlite_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir}/mlflow.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on loopback (what a team's tracking server is)."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.workdir / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.workdir}/server.db",
             "--artifacts-destination", str(self.workdir / "server-artifacts")],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        import urllib.request

        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.workdir / "mlflow-server.log").read_text()[-2000:])
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()
