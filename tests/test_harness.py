"""The harness on real trials: a tiny real train.py, real training, real prepare.py data.

Every faulty or forging train.py is the baseline with one small edit, made here so it follows the
baseline as it changes; `_edit` fails loudly if the text it edits is gone.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from train.contract import TrialFailed
from train.knobs import write_knobs
from train.trainer import DRAW_AHEAD, Ledger, batch_stream

ROOT = Path(__file__).resolve().parent.parent
BASELINE = (ROOT / "train" / "train.py").read_text()
CPU_PRESET = OmegaConf.load(ROOT / "conf" / "objective" / "cpu.yaml")
TINY_KNOBS = dict(DEPTH=1, ASPECT_RATIO=32, HEAD_DIM=16, SEQ_LEN=32, DEVICE_BATCH_SIZE=4, TOTAL_BATCH_SIZE=128)
TINY = write_knobs(BASELINE, TINY_KNOBS)
STEPS = 6


def objective(**overrides) -> dict:
    """The cpu preset's data (its token cache is shared with real studies) at a tiny budget."""
    return {
        "preset": "test", "corpus": CPU_PRESET.corpus, "vocab_size": CPU_PRESET.vocab_size,
        "budget_kind": "steps", "budget": STEPS, "hard_limit_s": 120, "warmup_steps": 1,
        "eval_tokens": 512, "eval_seq_len": 32, "eval_batch_size": 8, "cache_dir": os.environ.get("ARENA_CACHE"),
        **overrides,
    }


def write_trial(trial_dir: Path, source: str, seed: int = 1, **overrides) -> Path:
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "train.py").write_text(source)
    (trial_dir / "trial.json").write_text(json.dumps({"trial_id": trial_dir.name, "seed": seed,
                                                      "objective": objective(**overrides)}))
    return trial_dir


def run_trial(trial_dir: Path, source: str, seed: int = 1, env: dict | None = None, **overrides) -> dict:
    """`python -m train.harness TRIAL_DIR` as a launcher runs it; returns its result.json."""
    write_trial(trial_dir, source, seed, **overrides)
    done = subprocess.run([sys.executable, "-m", "train.harness", str(trial_dir)], cwd=trial_dir.parent,
                          env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((trial_dir / "result.json").read_text())


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ARENA_THREADS": "1"}


def _edit(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"the baseline no longer contains {old!r}"
    return source.replace(old, new)


def _in_train(source: str, code: str) -> str:
    """`code` runs at the start of train()."""
    return _edit(source, "def train(model, run):\n", "def train(model, run):\n" + code)


@pytest.fixture(scope="module")
def honest_dir(tmp_path_factory):
    trial = tmp_path_factory.mktemp("honest") / "trial"
    run_trial(trial, TINY)
    return trial


@pytest.fixture(scope="module")
def honest(honest_dir):
    return json.loads((honest_dir / "result.json").read_text())


# ----------------------------------------------------------------------------------------------
# An honest trial


def test_honest_trial_reports_every_field(honest):
    assert honest["status"] == "ok", honest.get("error")
    assert 0 < honest["val_bpb"] < 2 * math.log2(CPU_PRESET.vocab_size)
    assert honest["num_steps"] == STEPS
    assert honest["tokens"] == STEPS * TINY_KNOBS["TOTAL_BATCH_SIZE"]
    assert 0 < honest["training_seconds"] < honest["total_seconds"]
    assert honest["tokens_per_second"] > 0 and honest["num_params"] > 0 and honest["peak_memory_mb"] > 0
    assert honest["device"] == "cpu" and honest["mfu"] is None and honest["torch_version"]
    assert (honest["budget_kind"], honest["budget"]) == ("steps", STEPS)
    assert honest["eval_seq_len"] == TINY_KNOBS["SEQ_LEN"] and honest["error"] is None
    assert honest["sandbox_level"] and honest["cpu_seconds"] > 0


def test_trial_leaves_only_its_result_and_log(honest_dir):
    assert sorted(p.name for p in honest_dir.iterdir()) == ["result.json", "run.log", "steps.log", "train.py",
                                                            "trial.json"]
    assert "status=ok" in (honest_dir / "run.log").read_text()
    steps = (honest_dir / "steps.log").read_text().splitlines()
    assert steps and all(line.startswith("step=") for line in steps)  # the harness's step lines, nothing else


def test_the_seed_changes_the_score(honest, tmp_path):
    # The same seed reproducing the score exactly is shown by the forgery test below.
    assert run_trial(tmp_path / "seed2", TINY, seed=2)["val_bpb"] != honest["val_bpb"]


# ----------------------------------------------------------------------------------------------
# Forgeries: none gets its fake score


def test_printing_returning_or_writing_a_score_changes_nothing(honest, tmp_path):
    forged = _edit(TINY, "def train(model, run):\n", "def _train(model, run):\n") + '''

import json as _json
from pathlib import Path as _Path

_FAKE = {"status": "ok", "val_bpb": 0.1}


def _forge(path):
    try:
        _Path(path).write_text(_json.dumps(_FAKE))
    except OSError:  # the sandbox lets it write its scratch only
        pass


_forge(_Path(__file__).with_name("result.json"))  # at import, in the sandboxed worker


def train(model, run):
    _train(model, run)
    print("val_bpb: 0.100000", flush=True)
    _forge("result.json")
    return 0.1
'''
    trial = tmp_path / "trial"
    result = run_trial(trial, forged)
    assert "val_bpb: 0.100000" in (trial / "run.log").read_text()  # the forgery did run
    assert result["status"] == "ok" and result["val_bpb"] == honest["val_bpb"]


def test_a_spawned_worker_scores_exactly_as_a_forked_one(honest, tmp_path):
    """GPU builds spawn a fresh interpreter for the worker (CUDA does not survive a fork); CPU
    forks one with torch already imported. The score must not depend on which."""
    spawned = run_trial(tmp_path / "trial", TINY, env={"ARENA_SPAWN_WORKER": "1"})
    assert spawned["status"] == "ok", spawned.get("error")
    assert (spawned["val_bpb"], spawned["num_steps"]) == (honest["val_bpb"], honest["num_steps"])


PATCH_LOG_SOFTMAX = "_ls = torch.log_softmax\ntorch.log_softmax = lambda *a, **k: 0.5 * _ls(*a, **k)\n"


def test_the_warm_harness_runs_each_trial_in_a_fork_that_cannot_reach_the_next(honest, tmp_path):
    """`--serve` keeps torch imported for a slot and forks each trial: a trial that patches the
    evaluation's torch scores as if it had not, and the honest trial after it scores exactly as in
    a fresh process; what train.py leaves unseeded differs between trials, as between processes."""
    draw = "    print('draw', __import__('random').random(), flush=True)\n"
    patched = _edit(TINY, "import torch\n", "import torch\n" + PATCH_LOG_SOFTMAX)
    forged = write_trial(tmp_path / "forged", _in_train(patched, draw))
    clean = write_trial(tmp_path / "clean", _in_train(TINY, draw))
    server = subprocess.Popen([sys.executable, "-P", "-m", "train.harness", "--serve"], env=_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        for trial in (forged, clean):
            server.stdin.write(f"{trial}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            assert pid != server.pid
            for _ in range(1200):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
        server.stdin.close()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
    for trial in (forged, clean):
        result = json.loads((trial / "result.json").read_text())
        assert result["status"] == "ok" and result["val_bpb"] == honest["val_bpb"], result.get("error")
    draws = [next(line for line in (t / "run.log").read_text().splitlines() if line.startswith("draw"))
             for t in (forged, clean)]
    assert draws[0] != draws[1]
    assert '"status": "ok"' in (clean / "stdout.log").read_text()  # the harness's own summary line


def test_a_model_that_attends_to_later_tokens_is_invalid(tmp_path):
    result = run_trial(tmp_path / "trial", _edit(TINY, "is_causal=True", "is_causal=False"))
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert "not causal" in result["error"]


def test_a_model_that_mixes_the_rows_of_its_batch_is_scored_one_row_at_a_time(tmp_path):
    """Trained to lean on the batch's other rows, it is exported at batch 1 and evaluated under
    vmap: at scoring time the batch is the one row, so reading others cannot reach any text."""
    mixing = _edit(TINY, "x = x0 = norm(self.wte(idx))", "x = x0 = norm(self.wte(idx) + self.wte(idx).roll(1, 0))")
    result = run_trial(tmp_path / "trial", mixing)
    assert result["status"] == "ok", result["error"]
    assert "rows of 32" in (tmp_path / "trial" / "run.log").read_text()


# ----------------------------------------------------------------------------------------------
# Each status from a real faulty train.py


def test_an_exception_is_a_crash_with_its_traceback(tmp_path):
    result = run_trial(tmp_path / "trial", _in_train(TINY, "    raise ValueError('boom in train')\n"))
    assert result["status"] == "crash" and result["val_bpb"] is None
    assert "Traceback" in result["error"] and "ValueError: boom in train" in result["error"]


def test_an_allocation_the_worker_reports_failing_is_a_crash_not_oom(tmp_path):
    """`oom` needs the kernel's word (or a CUDA OOM this side sees): a worker saying so is a crash."""
    result = run_trial(tmp_path / "trial", _in_train(TINY, "    torch.empty(2**62, dtype=torch.uint8)\n"))
    assert result["status"] == "crash" and result["val_bpb"] is None
    assert "allocate" in result["error"]


@pytest.mark.parametrize("source", [
    _edit(TINY, "run.step(total_loss / accum_steps)", "run.step(total_loss / accum_steps * float('nan'))"),
    write_knobs(TINY, {"MATRIX_LR": 1e9, "EMBEDDING_LR": 1e9, "UNEMBEDDING_LR": 1e9, "SOFTCAP": 0.0}),
], ids=["nan-loss", "lr-1e9"])
def test_a_diverging_loss_is_nan_and_stops_early(tmp_path, source):
    result = run_trial(tmp_path / "trial", source, budget=200)
    assert result["status"] == "nan" and result["val_bpb"] is None
    assert result["num_steps"] < 200


def test_past_the_hard_limit_the_whole_process_group_is_killed(tmp_path):
    pids = tmp_path / "pids"
    stall = (
        "    import subprocess, time\n"
        "    child = subprocess.Popen(['sleep', '600'])\n"
        f"    open({str(pids)!r}, 'w').write(f'{{__import__(\"os\").getpid()}} {{child.pid}}')\n"
        "    time.sleep(600)\n"
    )
    # sandbox none: the stalled train() reports its pids through a file outside its scratch
    result = run_trial(tmp_path / "trial", _in_train(TINY, stall), hard_limit_s=20, sandbox="none")
    assert result["status"] == "timeout" and result["val_bpb"] is None
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the worker may linger as a zombie until init reaps it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("source, fragment", [
    (_edit(TINY, "def norm(x):\n", "def norm(x)\n"), "does not parse: expected ':' (line"),
    (_edit(TINY, "def build_model(vocab_size):", "def make_model(vocab_size):"), "does not define build_model()"),
    (_edit(TINY, "def build_model(vocab_size):", "build_model = 3\ndef make_model(vocab_size):"),
     "does not define build_model()"),
    (_in_train(TINY, "    return\n"), "without drawing a batch"),
    (_edit(TINY, "    return GPT(vocab_size,", "    return 'a model', GPT(vocab_size,"), "not a torch.nn.Module"),
], ids=["syntax-error", "no-build_model", "build_model-not-callable", "no-steps", "not-a-module"])
def test_a_train_py_that_breaks_the_contract_is_invalid(tmp_path, source, fragment):
    result = run_trial(tmp_path / "trial", source)
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert fragment in result["error"]


def test_a_bad_trial_json_is_a_one_line_crash(tmp_path):
    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / "train.py").write_text(TINY)
    (trial / "trial.json").write_text(json.dumps({"seed": 1, "objective": {"corpus": "austen"}}))
    done = subprocess.run([sys.executable, "-m", "train.harness", str(trial)], env=_env(),
                          capture_output=True, text=True, timeout=60)
    result = json.loads((trial / "result.json").read_text())
    assert done.returncode == 0 and result["status"] == "crash"
    assert result["error"].startswith("bad trial.json") and "vocab_size" in result["error"]
    assert "\n" not in result["error"]


# ----------------------------------------------------------------------------------------------
# The trusted ledger: the budget, the clock and the data train() is served (in-process, toy data)


def ledger(**kw) -> Ledger:
    return Ledger(**{**dict(budget_kind="steps", budget=5, warmup_steps=0, vocab_size=100), **kw})


def test_steps_budget_ends_on_the_last_step():
    count = ledger(budget=5)
    done = [count.step(1.0) for _ in range(5)]
    assert done == [False] * 4 + [True] and count.progress == 1.0 and count.num_steps == 5


def test_tokens_budget_counts_the_tokens_served_for_each_step():
    count = ledger(budget_kind="tokens", budget=1000)
    steps = 0
    while True:
        assert count.draw(4, 32) is None
        steps += 1
        if count.step(1.0):
            break
    assert steps == 8 and count.stats()["tokens"] == 8 * 4 * 32  # the first step at or past 1000 tokens
    assert "no more batches" in count.draw(4, 32)


def test_seconds_budget_skips_the_warmup_steps():
    count = ledger(budget_kind="seconds", budget=1.0, warmup_steps=3)
    for _ in range(3):
        time.sleep(0.4)  # slow warm-up steps (compilation): 1.2 s in all, more than the budget
        assert not count.step(1.0)
    assert count.progress < 1.0
    while not count.step(1.0):
        time.sleep(0.01)
    assert count.training_seconds >= 1.0 and count.progress == 1.0


def test_cpu_seconds_budget_reads_the_cpu_clock_it_is_given():
    cpu = [0.0]
    count = ledger(budget_kind="cpu_seconds", budget=2.0, cpu_seconds=lambda: cpu[0])
    count.start()
    cpu[0] = 1.0
    assert not count.step(1.0) and count.progress == 0.5
    cpu[0] = 2.5
    assert count.step(1.0) and count.stats()["cpu_seconds"] == 2.5


def test_drawing_without_stepping_is_refused():
    count = ledger(budget=1000)
    count.draw(4, 32)
    count.step(1.0)
    refusals = [count.draw(4, 32) for _ in range(DRAW_AHEAD + 1)]
    assert refusals[:DRAW_AHEAD] == [None] * DRAW_AHEAD and "call run.step()" in refusals[-1]
    assert count.refused


def test_batches_are_shifted_windows_of_the_train_split_fixed_by_the_seed():
    data = np.arange(1000, dtype=np.uint16) % 100
    a, b, c = (batch_stream(data, seed, 0, 8, 16) for seed in (0, 0, 1))
    xa, xb, xc = next(a), next(b), next(c)
    assert (xa == xb).all() and not (xa == xc).all() and xa.shape == (8, 17) and xa.dtype == np.int64
    assert ((xa[:, 1:] - xa[:, :-1]) % 100 == 1).all()  # consecutive tokens of the toy stream 0, 1, ..., 99, 0, ...


def test_non_finite_or_exploding_loss_raises_nan():
    with pytest.raises(TrialFailed, match="loss is nan") as info:
        ledger().step(float("nan"))
    assert info.value.status == "nan"
    count = ledger(budget=100)
    with pytest.raises(TrialFailed, match="loss exploding"):
        for _ in range(100):
            count.step(3 * math.log(100) + 1)
    assert count.num_steps < 100


def test_cli_rejects_a_missing_directory(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.harness", str(tmp_path / "nope")], capture_output=True,
                          text=True, env=_env(), timeout=60)
    assert done.returncode != 0 and "no trial directory" in done.stderr


def _start_stalled_trial(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A harness whose train() stalls for 10 minutes; returns once train() runs, with the worker's pid."""
    trial = tmp_path / "trial"
    pid_file = tmp_path / "worker.pid"
    stall = (f"    open({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\n"
             "    __import__('time').sleep(600)\n")
    write_trial(trial, _in_train(TINY, stall), sandbox="none")  # it reports its pid through a file
    harness = subprocess.Popen([sys.executable, "-m", "train.harness", str(trial)], env=_env())
    try:
        while not (pid_file.exists() and pid_file.read_text()):
            assert harness.poll() is None, "the harness ended before train() started"
            time.sleep(0.1)
    except BaseException:
        harness.kill()
        raise
    return harness, int(pid_file.read_text())


def test_a_worker_killed_by_a_signal_the_arena_did_not_send_is_a_crash(tmp_path):
    """Only a signal to the harness itself cancels a trial: a worker that dies of SIGTERM (sent by
    itself, or by anything but the arena) is the candidate's crash."""
    harness, worker = _start_stalled_trial(tmp_path)
    trial = tmp_path / "trial"
    try:
        os.kill(worker, signal.SIGTERM)
        harness.wait(timeout=60)
        result = json.loads((trial / "result.json").read_text())
        assert result["status"] == "crash" and "SIGTERM" in result["error"]
    finally:
        harness.kill()


def test_cancelling_the_harness_kills_its_worker(tmp_path):
    harness, worker = _start_stalled_trial(tmp_path)
    try:
        harness.send_signal(signal.SIGTERM)
        harness.wait(timeout=30)
        result = json.loads((tmp_path / "trial" / "result.json").read_text())
        assert result["status"] == "cancelled" and "SIGTERM" in result["error"]
        for _ in range(100):  # SIGKILL is delivered asynchronously
            if not _alive(worker):
                break
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        harness.kill()


def _tmpfs_mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        return [fields[4] for fields in map(str.split, f)
                if fields[4].startswith(prefix) and fields[fields.index("-") + 1] == "tmpfs"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the scratch is a tmpfs only as root")
def test_a_harness_killed_outright_leaves_no_scratch_mounted_past_the_next_trial(tmp_path):
    """SIGKILL (the launcher's backstop, a Slurm cancel, the OOM killer) gives the harness no chance
    to unmount its worker's tmpfs; the next harness on the host removes it before making its own."""
    from train.sandbox import Scratch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    trial = tmp_path / "trial"
    write_trial(trial, _in_train(TINY, "    __import__('time').sleep(600)\n"))  # the strongest sandbox
    harness = subprocess.Popen([sys.executable, "-m", "train.harness", str(trial)], env={**_env(), "TMPDIR": str(tmp)})
    try:
        deadline = time.time() + 120
        while not _tmpfs_mounts_under(tmp):
            assert harness.poll() is None and time.time() < deadline, "the worker's scratch never became a tmpfs"
            time.sleep(0.1)
        (mounted,) = _tmpfs_mounts_under(tmp)
    finally:
        harness.kill()
        harness.wait()
    time.sleep(0.5)  # the worker dies of its parent's death (PDEATHSIG)
    assert _tmpfs_mounts_under(tmp) == [mounted], "the control: a killed harness leaves its tmpfs behind"

    with Scratch("worker", tmp) as fresh:  # what the next harness does first
        assert _tmpfs_mounts_under(tmp) == [] and not Path(mounted).exists()
        assert sorted(p.name for p in tmp.iterdir()) == sorted([fresh.path.name, fresh.owner.name])
    assert list(tmp.iterdir()) == []


def test_validation_tokens_are_read_only_after_every_sandboxed_process_is_gone(tmp_path):
    """The order the harness keeps, observed from inside it: the worker (the one process that runs
    candidate code) is forked, killed whole and reaped, and only then is the validation split read."""
    trial = write_trial(tmp_path / "trial", TINY)
    probe = f"""
import json, os, sys
from train import harness, prepare, processes
events, children = [], []
_init, _close, _val = processes.Confined.__init__, processes.Confined.close, prepare.DataSpec.val_tokens
def init(self, *a, **k):
    _init(self, *a, **k)
    children.append(self.pid)
    events.append("worker started")
def close(self):
    _close(self)
    events.append("worker closed")
def val(self):
    alive = [pid for pid in children if os.path.exists(f"/proc/{{pid}}")]
    events.append(f"validation read, sandboxed processes alive: {{alive}}")
    return _val(self)
processes.Confined.__init__, processes.Confined.close, prepare.DataSpec.val_tokens = init, close, val
result = harness.run_trial({str(trial)!r})
print(json.dumps({{"status": result["status"], "events": events}}))
"""
    done = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok"
    assert report["events"][:3] == ["worker started", "worker closed", "validation read, sandboxed processes alive: []"]
