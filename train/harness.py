"""The fixed harness: run one trial's train.py for its budget, score it, write a signed result.

    python -m train.harness TRIAL_DIR

reads TRIAL_DIR/trial.json and TRIAL_DIR/train.py, writes TRIAL_DIR/run.log and, last and
atomically, TRIAL_DIR/result.json. No searcher edits this file.

This process is the trusted side and never imports or runs train.py. The candidate runs only in a
sandboxed child (processes.py) that sees its own scratch folder and nothing of the study: a worker
that trains on batches this process serves and counts (trainer.py) and then exports its model as a
pure tensor program (export.py). Once the worker's whole tree is dead, this process checks that
program (graph.py) and scores it itself with prepare.py's fixed metric (scorer.py): validation
tokens are read only here, and only then. Every figure in the result is measured here or read from
the kernel; every status comes from evidence this side holds (`oom` from the kernel, `cancelled`
from a signal this process received); the result is signed with the study's key, read only after
the last child is gone.

    python -m train.harness --serve

is the same harness kept warm for one slot: torch is imported once, and each trial directory read
from stdin runs in a fork of it (the local launcher uses this; a trial then starts training in
well under a second instead of paying `import torch` every time). The sandbox is entered in each
trial's own children, after the forks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from train import integrity, sandbox
from train.contract import (BUDGET_KINDS, DEFAULT_SANDBOX, LOG_FILE, MODEL_FILE, RESULT_FILE, RUNNING_LOCK,
                            STDOUT_FILE, STEPS_FILE, TRAIN_FILE, TRIAL_FILE, TrialFailed)
from train.runlog import RunLog

OBJECTIVE_KEYS = ("corpus", "vocab_size", "budget_kind", "budget", "hard_limit_s", "warmup_steps",
                  "eval_tokens", "eval_seq_len", "eval_batch_size")
RESULT_FIELDS = ("status", "val_bpb", "training_seconds", "total_seconds", "num_steps", "tokens", "num_params",
                 "peak_memory_mb", "mfu", "tokens_per_second", "device", "host", "torch_version", "budget_kind",
                 "budget", "error", "sandbox_level", "cpu_seconds", "trusted_cpu_seconds")
SIGNAL_GRACE_S = 2.0  # a worker killed by a signal: how long to wait for the arena's own signal to reach us
# Dense bf16 peak of the device, for MFU; matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12))


_TRIALS_RUN = []  # run_trial runs once per process: `serve` forks a fresh one for each trial
_TORCH_CACHE: list = []  # this process's own folder for torch's caches (a sandbox.Scratch), made once


def run_trial(trial_dir) -> dict:
    """Run the trial in `trial_dir` and return what was written to its result.json. Once per
    process: a harness that has scored a trial holds a torch thread pool, and a child forked from it
    hangs in its first parallel region (GNU OpenMP does not survive a fork)."""
    started = time.time()
    trial_dir = Path(trial_dir).resolve()
    _clear(trial_dir)
    result = {**dict.fromkeys(RESULT_FIELDS), "status": "crash", "host": platform.node()}
    previous = _cancel_on_signals()
    try:
        if _TRIALS_RUN:
            raise RuntimeError(f"this process already ran trial {_TRIALS_RUN[0]}: run each trial in a fresh "
                               "process (python -m train.harness TRIAL_DIR, or a fork of --serve)")
        _TRIALS_RUN.append(str(trial_dir))
        spec = _read_spec(trial_dir)
        objective = spec["objective"]
        result.update(trial_id=spec.get("trial_id"), seed=spec["seed"],
                      budget_kind=objective["budget_kind"], budget=objective["budget"])
        _preflight(trial_dir / TRAIN_FILE)
        _train_and_score(trial_dir, spec, result, started)
        result["status"] = "ok"
    except TrialFailed as e:
        result.update(status=e.status, error=str(e))
    except Exception:  # noqa: BLE001 - a harness bug: still a result, and never `ok`
        result.update(status="crash", error="harness error: " + _tail(traceback.format_exc()))
    finally:
        for sig in previous:  # nothing interrupts the writing of the result
            signal.signal(sig, signal.SIG_IGN)
    try:
        result["total_seconds"] = round(time.time() - started, 3)
        result["trusted_cpu_seconds"] = _own_cpu_seconds()
        _log(trial_dir, f"harness: status={result['status']} val_bpb={result['val_bpb']}"
                        + (f" error={result['error'].splitlines()[-1]}" if result.get("error") else ""))
        return integrity.write_signed_result(trial_dir, result)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _clear(trial_dir: Path) -> None:
    """The trial folder is this harness's: whatever an earlier run left in the way goes."""
    stale = trial_dir / RESULT_FILE
    if stale.is_dir() and not stale.is_symlink():
        shutil.rmtree(stale, ignore_errors=True)
    else:
        stale.unlink(missing_ok=True)
    (trial_dir / LOG_FILE).write_text("")
    (trial_dir / STEPS_FILE).write_text("")


def _cancel_on_signals() -> dict:
    """SIGTERM or SIGINT to this process is the arena (or Slurm, or an operator) stopping the
    trial: the only way a trial becomes `cancelled`."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def cancelled(signum, frame):
        raise TrialFailed("cancelled", f"the harness received {signal.Signals(signum).name}: "
                                       "the trial was stopped from outside")

    return {sig: signal.signal(sig, cancelled) for sig in (signal.SIGTERM, signal.SIGINT)}


def _read_spec(trial_dir: Path) -> dict:
    try:
        spec = json.loads((trial_dir / TRIAL_FILE).read_text())
        objective = spec["objective"]
        missing = [k for k in OBJECTIVE_KEYS if k not in objective]
        if missing:
            raise ValueError(f"objective lacks {', '.join(missing)}")
        if objective["budget_kind"] not in BUDGET_KINDS:
            raise ValueError(f"budget_kind must be one of {BUDGET_KINDS}, got {objective['budget_kind']!r}")
        if not objective["budget"] > 0:
            raise ValueError(f"budget must be > 0, got {objective['budget']!r}")
        for key in ("eval_tokens", "eval_seq_len", "eval_batch_size"):
            if type(objective[key]) is not int or not 0 < objective[key] <= 1 << 30:
                raise ValueError(f"{key} must be a positive int, got {objective[key]!r}")
        if objective["eval_seq_len"] < 2:
            raise ValueError(f"eval_seq_len must be at least 2, got {objective['eval_seq_len']}")
        spec["seed"] = int(spec.get("seed") or 0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrialFailed("crash", f"bad {TRIAL_FILE} in {trial_dir}: {e}") from None
    return spec


def _preflight(path: Path) -> None:
    """Reject a train.py that cannot work before any compute is spent on it (parsed, never run)."""
    import ast

    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except OSError as e:
        raise TrialFailed("invalid", f"cannot read train.py: {e}") from None
    except (SyntaxError, ValueError) as e:
        why = f"{e.msg} (line {e.lineno})" if isinstance(e, SyntaxError) else str(e)
        raise TrialFailed("invalid", f"train.py does not parse: {why}") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    missing = [name for name in ("build_model", "train") if name not in defined]
    if missing:
        raise TrialFailed("invalid", f"train.py does not define {' and '.join(missing)}()")


def _private_torch_cache() -> None:
    """Importing torch._dynamo (the export path, the flop counter) makes $TMPDIR/torchinductor_<user>
    and leaves it there: this process's copy goes into a scratch of its own instead, removed when
    it exits and swept by the next harness if it is killed. A sandboxed worker has its own (its
    scratch, by allowed_env)."""
    if not _TORCH_CACHE:
        import atexit

        cache = sandbox.Scratch("torch-cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.path)
        _TORCH_CACHE.append(cache)
        atexit.register(cache.close)


def _train_and_score(trial_dir: Path, spec: dict, result: dict, started: float) -> None:
    _private_torch_cache()
    import torch

    from train import graph, prepare, scorer
    from train.processes import fork_safe

    objective, seed = spec["objective"], spec["seed"]
    try:
        level = sandbox.check_level(objective.get("sandbox") or DEFAULT_SANDBOX)
    except sandbox.SandboxUnavailable as e:
        raise TrialFailed("crash", f"sandbox: {e}") from None
    result["sandbox_level"] = level
    data = prepare.prepare(objective["corpus"], objective["vocab_size"], objective.get("cache_dir"))
    _verify_cache(data, objective, ("train", "token_bytes"))
    # The slot's share of the cores, for every process of the trial (None: torch's default). This
    # process sets it on itself only after its last fork: a torch with a thread pool forks children
    # that are not single-threaded, and confine() refuses those.
    threads = os.environ.get("ARENA_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = int(threads) if threads else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch_version=torch.__version__)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    log = RunLog(trial_dir / LOG_FILE)

    code = sandbox.Scratch("code")  # read-only to the sandbox: the candidate's train.py and trial.json
    try:
        os.chmod(code.path, 0o755)
        for name in (TRAIN_FILE, TRIAL_FILE):  # the candidate may read its own spec: seed, budget, trial id
            shutil.copyfile(trial_dir / name, code.path / name)
            os.chmod(code.path / name, 0o644)
        config = {"seed": seed, "vocab_size": data.vocab_size, "device": device, "threads": threads,
                  "code_dir": str(code.path), "eval_seq_len": objective["eval_seq_len"]}
        raw, max_bytes, ledger = _train(trial_dir, objective, level, config, env, fork_safe(), result, started,
                                        data, log)
    finally:
        code.close()
        log.close()
    # The worker's whole tree is dead and its scratch gone: from here on this process alone holds
    # anything, and only now does it look at the validation split.
    # The hard limit covers the whole trial: a program the scorer cannot finish by then is a timeout.
    program = scorer.load_program(raw, objective, data.vocab_size, max_bytes, started + objective["hard_limit_s"])
    del raw
    result["num_params"], matmul_params = graph.count_params(program, data.vocab_size)
    if threads:
        torch.set_num_threads(threads)
    _verify_cache(data, objective, ("val",))
    scores = scorer.evaluate(program, data, objective, device, log.line)
    if not math.isfinite(scores["val_bpb"]):
        raise TrialFailed("nan", f"val_bpb is {scores['val_bpb']}")
    result.update(val_bpb=scores["val_bpb"], eval_seq_len=objective["eval_seq_len"],
                  eval_seconds=scores["eval_seconds"], causality_checks=scores["causality_checks"],
                  eval_work_per_token=round(program.work_per_token), mfu=_mfu(result, matmul_params, device))


def _train(trial_dir: Path, objective: dict, level: str, config: dict, env: dict, fork: bool, result: dict,
           started: float, data, log: RunLog):
    """The sandboxed worker trains on what this process serves and exports its model; returns the
    exported model's bytes (unchecked), their bound, and this side's ledger of the training."""
    from train import scorer
    from train.processes import Confined, readable_paths
    from train.trainer import Ledger, WorkerFailed, WorkerGone, serve_training, warmup_limit

    owned = sandbox.Scratch("worker")  # empty: the sandbox mounts a tmpfs of disk_mb on it
    scratch = owned.path
    devices = sandbox.gpu_devices() if config["device"] == "cuda" else ()
    policy = sandbox.Policy(scratch=scratch, readable=readable_paths(config["code_dir"]),
                            env=sandbox.allowed_env(scratch, env), memory_mb=objective.get("memory_mb"),
                            devices=devices)
    worker = None
    try:
        worker = Confined("worker", policy, level, log.pipe(), config, fork)
        ledger = Ledger(objective["budget_kind"], objective["budget"], objective["warmup_steps"], config["vocab_size"],
                        cpu_seconds=worker.tree.cpu_seconds, warmup_limit_s=warmup_limit(objective))
        log.line(f"harness: sandbox {level}, budget {objective['budget']} {objective['budget_kind']}, "
                 f"worker ready to start {time.time() - started:.2f} s after the harness started")
        device_memory = _DeviceMemory(config["device"])
        try:
            serve_training(worker, ledger, data.train_tokens(), config["seed"], started + objective["hard_limit_s"],
                           log.line, watch=device_memory,
                           log_step=lambda line: (log.line(line), _log(trial_dir, line, STEPS_FILE)),
                           limit_s=objective["hard_limit_s"])
        except WorkerGone:
            raise _why_the_worker_ended(worker) from None
        except WorkerFailed as e:
            raise _claimed_failure(e, worker, device_memory) from None
        finally:
            worker.end()
            result.update(ledger.stats(), peak_memory_mb=_peak_memory_mb(worker))
        max_bytes = policy.disk_mb << 20
        return scorer.read_model(scratch / MODEL_FILE, max_bytes), max_bytes, ledger
    finally:
        if worker:
            worker.close()
        owned.close()


def _verify_cache(data, objective: dict, which: tuple[str, ...]) -> None:
    """The token caches must hold what the study prepared (objective.data_digests, recorded when the
    study started): a cache rewritten since would change what every later trial trains or is scored on."""
    expected = objective.get("data_digests") or {}
    paths = {"train": data.train_path, "val": data.val_path, "token_bytes": data.token_bytes_path}
    for name in which:
        if name in expected and integrity.file_digest(paths[name]) != expected[name]:
            raise TrialFailed("crash", f"the {name} token cache {paths[name]} changed since the study started "
                                       "(its digest differs): rebuild it with `python -m train.prepare`")


def _why_the_worker_ended(worker) -> TrialFailed:
    """The worker's socket closed without its weights: say why from evidence this side holds."""
    deadline = time.time() + SIGNAL_GRACE_S
    while not worker.exited() and time.time() < deadline:  # a closed socket: the worker is on its way out
        time.sleep(0.01)
    if not worker.exited():
        worker.end()
        return TrialFailed("crash", "the worker closed its connection to the harness without handing its weights over")
    code = worker.end()
    if worker.tree.oom_killed():
        return TrialFailed("oom", "the kernel killed the worker for memory (out of its sandbox's memory limit)")
    # A PID namespace's init cannot die of a signal it got from inside: it exits 128+n instead.
    killed_by = -code if code < 0 else code - 128 if 128 < code < 128 + signal.NSIG else 0
    if killed_by:
        name = signal.Signals(killed_by).name
        time.sleep(SIGNAL_GRACE_S)  # if the arena stopped the trial, its signal to us arrives now and raises
        return TrialFailed("crash", f"the worker was killed by {name}, which the arena did not send "
                                    "(train.py or something it started)")
    return TrialFailed("crash", f"the worker exited with code {code} without handing its weights over; see {LOG_FILE}")


def _claimed_failure(e, worker, device_memory) -> TrialFailed:
    """What the worker says went wrong. Only failures are taken from it, never `oom` (which needs the
    kernel's word, or this side seeing the GPU full) or `cancelled` (which needs our own signal)."""
    worker.end()
    if worker.tree.oom_killed():
        return TrialFailed("oom", "the kernel killed a process of the worker for memory")
    if e.claimed == "invalid":
        return TrialFailed("invalid", str(e))
    if e.claimed == "budget":
        return TrialFailed("crash", f"train() went on after the budget was spent: {str(e).splitlines()[-1]}")
    if e.claimed == "oom" and device_memory.full():
        return TrialFailed("oom", f"the GPU was full ({device_memory.least_free:.1%} free) when train() failed "
                                  f"to allocate: {str(e).splitlines()[-1]}")
    if e.claimed == "oom":
        return TrialFailed("crash", f"train() failed to allocate memory (neither the kernel nor the GPU was "
                                    f"seen out of memory): {str(e).splitlines()[-1]}")
    return TrialFailed("crash", str(e))


class _DeviceMemory:
    """The GPU's free memory as this process sees it while the worker trains: the trusted side's own
    sight of a CUDA out-of-memory (the worker saying so is not evidence)."""

    FULL = 0.05  # free fraction under which an allocation failure counts as out of memory

    def __init__(self, device: str):
        self.cuda, self.least_free, self._last = device == "cuda", None, 0.0

    def __call__(self, force: bool = False) -> None:
        if not self.cuda or (not force and time.time() - self._last < 0.5):
            return
        import torch

        free, total = torch.cuda.mem_get_info()
        self._last = time.time()
        self.least_free = min(self.least_free if self.least_free is not None else 1.0, free / total)

    def full(self) -> bool:
        return self.least_free is not None and self.least_free < self.FULL


def _own_cpu_seconds() -> float:
    """CPU time of this process (the trusted side of the trial: serving batches, checking and scoring
    the model), from the kernel; a fork of the warm harness starts its own account at zero."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def _peak_memory_mb(worker) -> float | None:
    peak = worker.tree.peak_memory_mb()
    if peak is None:  # the kernel's high-water mark of the children this process reaped (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(peak, 1)


def _mfu(result: dict, matmul_params: int, device: str):
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in (result.get("device") or "")), None)
    rate = result.get("tokens_per_second")
    if device != "cuda" or peak is None or not rate:
        return None
    return round(6 * matmul_params * rate / peak, 4)


def serve() -> None:
    """A warm harness for one slot of the local launcher: torch is imported once, then each trial
    directory read from stdin runs in a fork, exactly as `python -m train.harness TRIAL_DIR` would
    run it, and its pid is written back. It never runs a trial's code itself, nor reads validation
    tokens or result keys, so a trial cannot reach the next one through it. EOF on stdin ends it."""
    import torch  # noqa: F401 - the point of a warm harness

    from train import graph, prepare, scorer, trainer  # noqa: F401
    from train.processes import fork_safe

    if not fork_safe():
        sys.exit("error: --serve forks trials, which a GPU runtime does not survive: "
                 "run `python -m train.harness TRIAL_DIR` per trial instead")
    _warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the launcher watches the trials; nobody reaps them here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ready", flush=True)
    while line := sys.stdin.readline():
        trial_dir = line.strip()
        if not trial_dir:
            continue
        os.chdir(trial_dir)  # before the fork: the launcher knows the trial's process by its cwd
        running = hold_running_lock(trial_dir)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _become_own_process(STDOUT_FILE)
                _print_summary(run_trial(trial_dir))
                code = 0
            except BaseException:  # noqa: BLE001 - a harness bug is in stdout.log; the launcher sees no result
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(running)  # the fork holds it now, for as long as the trial lives (it outlives its children)
        print(pid, flush=True)


def _warm_up() -> None:
    """Pay here, once per slot, what every trial would otherwise pay at its first export and its
    first scoring (importing torch.export and its tracer, the first trace, the flop counter, vmap):
    about 2 s of a tiny trial. The model is a fixed one of ours, no candidate's. One thread only, so
    no OpenMP pool exists when the trials are forked (GNU OpenMP does not survive a fork)."""
    import tempfile

    _private_torch_cache()
    import torch

    from train import graph
    from train.export import export_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8))
        with tempfile.TemporaryDirectory(prefix="arena-warm-") as folder:
            path = Path(folder) / "model"
            export_model(model, 4, path)
            program = graph.load(path.read_bytes(), graph.Limits(), vocab_size=8, seq_len=4)
        program.check_lengths([2, 3])
        with torch.no_grad():
            torch.vmap(program)(torch.zeros(2, 1, 4, dtype=torch.int64))
    finally:
        torch.set_num_threads(threads)


def hold_running_lock(trial_dir: str | os.PathLike) -> int:
    """Lock the trial's running.lock before forking it, so that the trial is marked live from its
    first instant: a launcher killed between this fork and hearing the pid must not conclude on
    restart that the trial never started. The trial's harness keeps the descriptor (its sandboxed
    children close it, and die with it)."""
    import fcntl

    fd = os.open(Path(trial_dir) / RUNNING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):  # already held: a launcher bug, but the trial still runs
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _become_own_process(output: str) -> None:
    """Make a fresh fork what a newly started harness would be: its own session (a group kill
    takes it), output to `output`, no stdin, default signal handlers."""
    os.setsid()
    out = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def _log(trial_dir: Path, line: str, name: str = LOG_FILE) -> None:
    with open(trial_dir / name, "a") as log:
        log.write(line + "\n")


def _print_summary(result: dict) -> None:
    summary = ("status", "val_bpb", "num_steps", "training_seconds", "total_seconds")
    print(json.dumps({k: result.get(k) for k in summary}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--serve"]:
        serve()
        return
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m train.harness TRIAL_DIR   (TRIAL_DIR holds train.py and trial.json)\n"
                 "       python -m train.harness --serve     (warm: trial directories on stdin, pids on stdout)")
    if not Path(args[0]).is_dir():
        sys.exit(f"error: no trial directory {args[0]}")
    from train.processes import fork_safe

    if fork_safe():  # the worker will be a fork of this process: it inherits the warmed export path
        _warm_up()
    _print_summary(run_trial(args[0]))


if __name__ == "__main__":
    main()
