"""The fixed harness: run one trial's train.py for its budget and score it with prepare.py's code.

    python -m train.harness TRIAL_DIR

reads TRIAL_DIR/trial.json and TRIAL_DIR/train.py, writes TRIAL_DIR/run.log and, last and
atomically, TRIAL_DIR/result.json. No searcher edits this file.

Two processes, so that the score cannot be forged. A worker (a fork of this process, in its own
process group, killed at the hard limit) imports train.py and runs train(model, run), where `run`
counts steps and tokens, keeps the clock and says when the budget is spent; then it saves the
weights. This parent never runs train.py's training code: it rebuilds the model from those
weights, checks that it is causal, computes val_bpb with prepare.py, and then checks that importing
and running train.py here left torch, numpy and prepare untouched. What train.py prints, returns
or writes is ignored.

    python -m train.harness --serve

is the same harness kept warm for one slot: torch is imported once, and each trial directory read
from stdin runs in a fork of it (the local launcher uses this; a trial then starts training in
well under a second instead of paying `import torch` and torch._dynamo every time).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRIAL_FILE, RESULT_FILE, LOG_FILE = "trial.json", "result.json", "run.log"
WORKER_FILE, WEIGHTS_FILE = "worker.json", "weights.pt"  # the worker's hand-over, removed after use
OBJECTIVE_KEYS = ("corpus", "vocab_size", "budget_kind", "budget", "hard_limit_s", "warmup_steps",
                  "eval_tokens", "eval_batch_size")
BUDGET_KINDS = ("seconds", "steps", "tokens")
RESULT_FIELDS = ("status", "val_bpb", "training_seconds", "total_seconds", "num_steps", "tokens", "num_params",
                 "peak_memory_mb", "mfu", "tokens_per_second", "device", "host", "torch_version", "budget_kind",
                 "budget", "error")
EXPLODING_STEPS = 10  # consecutive steps with a loss above 3x a uniform guess's end the trial as nan
LOG_EVERY_S = 5.0
# Dense bf16 peak of the device, for MFU; matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


class TrialFailed(Exception):
    """Ends a trial with `status` (not `ok`) and a one-line reason."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Run:
    """What train.py's train() gets: the data, the budget and the clock.

    The first `warmup_steps` optimizer steps (compilation, allocator warm-up) do not count against
    a seconds budget; they do count as steps and tokens, since they train the model.
    """

    def __init__(self, *, device, vocab_size, train_tokens, seed, budget_kind, budget, warmup_steps):
        import torch

        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.seed = seed
        self.budget_kind, self.budget, self.warmup_steps = budget_kind, budget, warmup_steps
        self.num_steps = self.tokens = 0
        self.seq_len = None  # the longest sequence train() trained on: val_bpb is measured there
        self._data = train_tokens
        self._streams = 0
        self._drawn = 0
        self._warm_tokens = 0
        self._t_counted = time.perf_counter() if warmup_steps == 0 else None
        self._t_end = None
        self._high_loss_steps = 0
        self._last_log = time.perf_counter()

    def batches(self, batch_size: int, seq_len: int):
        """Random windows of the train split as (inputs, targets) on the device, forever; the same
        sequence for the same seed and call order."""
        import numpy as np
        import torch

        if seq_len + 1 > len(self._data):
            raise ValueError(f"seq_len {seq_len} is longer than the train split ({len(self._data)} tokens)")
        self.seq_len = max(self.seq_len or 0, seq_len)
        rng = np.random.default_rng([self.seed, self._streams])
        self._streams += 1
        window = np.arange(seq_len + 1)
        while True:
            starts = rng.integers(0, len(self._data) - seq_len, size=batch_size)
            chunk = torch.from_numpy(self._data[starts[:, None] + window].astype(np.int64))
            if self.device.type == "cuda":
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            self._drawn += batch_size * seq_len
            yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def step(self, loss) -> bool:
        """Count one optimizer step (and the tokens drawn for it); True once the budget is spent."""
        loss = float(loss)
        now = time.perf_counter()
        self.num_steps += 1
        self.tokens = self._drawn
        if not math.isfinite(loss):
            raise TrialFailed("nan", f"loss is {loss} at step {self.num_steps}")
        if self.num_steps > self.warmup_steps and loss > 3 * math.log(self.vocab_size):
            self._high_loss_steps += 1
            if self._high_loss_steps >= EXPLODING_STEPS:
                raise TrialFailed("nan", f"loss exploding: {loss:.2f} for {EXPLODING_STEPS} steps "
                                         f"(step {self.num_steps})")
        else:
            self._high_loss_steps = 0
        if self.num_steps == self.warmup_steps:
            self._t_counted, self._warm_tokens = now, self.tokens
        done = self.progress >= 1.0
        if done or now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self.log(step=self.num_steps, loss=round(loss, 4), progress=round(self.progress, 3),
                     training_seconds=round(self.training_seconds, 2))
        if done and self._t_end is None:
            self._t_end = now
        return done

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, 0..1: the clock for learning-rate schedules."""
        if self.budget_kind == "steps":
            spent = self.num_steps
        elif self.budget_kind == "tokens":
            spent = self.tokens
        else:
            spent = self.training_seconds
        return min(1.0, spent / self.budget)

    @property
    def training_seconds(self) -> float:
        if self._t_counted is None:
            return 0.0
        return (self._t_end or time.perf_counter()) - self._t_counted

    def autocast(self):
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compile(self, model):
        import torch

        return torch.compile(model) if self.device.type == "cuda" else model

    def log(self, **values) -> None:
        print(" ".join(f"{k}={v}" for k, v in values.items()), flush=True)

    def stats(self) -> dict:
        seconds = self.training_seconds
        counted_tokens = self.tokens - self._warm_tokens
        return {
            "num_steps": self.num_steps,
            "tokens": self.tokens,
            "training_seconds": round(seconds, 3),
            "tokens_per_second": round(counted_tokens / seconds, 1) if seconds > 0 else None,
            "seq_len": self.seq_len,
        }


# ----------------------------------------------------------------------------------------------
# The parent: spawn, watch, evaluate, write the result


def run_trial(trial_dir) -> dict:
    """Run the trial in `trial_dir` and return what was written to its result.json."""
    started = time.time()
    trial_dir = Path(trial_dir).resolve()
    for name in (RESULT_FILE, WORKER_FILE, WEIGHTS_FILE):
        (trial_dir / name).unlink(missing_ok=True)
    (trial_dir / LOG_FILE).write_text("")
    result = {**dict.fromkeys(RESULT_FIELDS), "status": "crash", "host": platform.node()}
    try:
        spec = _read_spec(trial_dir)
        objective = spec["objective"]
        result.update(trial_id=spec.get("trial_id"), seed=spec["seed"],
                      budget_kind=objective["budget_kind"], budget=objective["budget"])
        _preflight(trial_dir / "train.py")
        report = _train_in_worker(trial_dir, objective, started)
        result.update({k: v for k, v in report.items() if k in _REPORTED})
        if report["status"] != "ok":
            raise TrialFailed(report["status"], report.get("error") or "")
        result.update(_evaluate(trial_dir, spec, report))
        result["status"] = "ok"
    except TrialFailed as e:
        result.update(status=e.status, error=str(e))
    except Exception as e:  # noqa: BLE001 - train.py failing here, or a harness bug: still a result, never a lost trial
        result.update(status=_classify(e), error=_tail(traceback.format_exc()))
    finally:
        (trial_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    if result["device"] is None and "torch" in sys.modules:  # the worker never reported (killed)
        result.update(device=_device_name(sys.modules["torch"]), torch_version=sys.modules["torch"].__version__)
    result["total_seconds"] = round(time.time() - started, 3)
    _log(trial_dir, f"harness: status={result['status']} val_bpb={result['val_bpb']}"
                    + (f" error={result['error'].splitlines()[-1]}" if result.get("error") else ""))
    _write_json(trial_dir / RESULT_FILE, result)
    return result


_REPORTED = ("num_steps", "tokens", "training_seconds", "tokens_per_second", "num_params",
             "peak_memory_mb", "device", "torch_version")


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
        spec["seed"] = int(spec.get("seed") or 0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrialFailed("crash", f"bad {TRIAL_FILE} in {trial_dir}: {e}") from None
    return spec


def _preflight(path: Path) -> None:
    """Reject a train.py that cannot work before any compute is spent on it."""
    import ast

    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except OSError as e:
        raise TrialFailed("invalid", f"cannot read train.py: {e}") from None
    except (SyntaxError, ValueError) as e:
        raise TrialFailed("invalid", f"train.py does not parse: {_syntax_error(e)}") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    missing = [name for name in ("build_model", "train") if name not in defined]
    if missing:
        raise TrialFailed("invalid", f"train.py does not define {' and '.join(missing)}()")


def _syntax_error(e: Exception) -> str:
    if isinstance(e, SyntaxError):
        return f"{e.msg} (line {e.lineno})"
    return str(e)


def _train_in_worker(trial_dir: Path, objective: dict, started: float) -> dict:
    warm_up()
    worker = _ForkedWorker(trial_dir, started) if fork_safe() else _SpawnedWorker(trial_dir, started)

    def kill():
        _kill_group(worker.pid)

    def on_signal(signum, frame):  # the harness is being cancelled: take the worker along
        kill()
        sys.exit(128 + signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = started + objective["hard_limit_s"]
        code = worker.wait(deadline)
        if code is None:
            kill()
            worker.wait(None)
            raise TrialFailed("timeout", f"killed at the hard limit of {objective['hard_limit_s']} s "
                                         f"({objective['budget']} {objective['budget_kind']} budget)") from None
    finally:
        kill()  # anything train.py left running in the worker's group
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        report = json.loads((trial_dir / WORKER_FILE).read_text())
    except (OSError, ValueError):
        if code == -signal.SIGKILL:
            raise TrialFailed("oom", "the worker was killed by SIGKILL (out of memory?)") from None
        if code in (-signal.SIGTERM, -signal.SIGINT):
            # A scheduler cancelling the job signals every process it tracks; the worker may get
            # it before this process does. That is the job being stopped, not train.py crashing.
            raise TrialFailed("cancelled", f"the worker was stopped by {signal.Signals(-code).name} "
                                           "from outside (the job was cancelled)") from None
        raise TrialFailed("crash", f"the worker exited with code {code} without a report; see {LOG_FILE}") from None
    finally:
        (trial_dir / WORKER_FILE).unlink(missing_ok=True)
    return report


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def warm_up() -> None:
    """Import what every trial needs before the worker forks, so the worker starts training at once.
    torch.optim's first optimizer imports torch._dynamo (1.5 s on a CPU), which is most of a
    trial's fixed cost after `import torch` itself."""
    import torch
    import torch._dynamo  # noqa: F401

    from train import prepare  # noqa: F401


def fork_safe() -> bool:
    """A process that has imported torch may fork a worker only where no GPU runtime can be live in
    it: CUDA and ROCm do not survive a fork, so a GPU build with visible devices spawns a fresh
    interpreter (the 2-3 s this costs are under 1% of a GPU trial's budget)."""
    import torch

    if os.environ.get("ARENA_SPAWN_WORKER") == "1":  # the GPU path, forced (tests, debugging)
        return False
    gpu_build = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
    return not gpu_build or os.environ.get("CUDA_VISIBLE_DEVICES") == ""


class _SpawnedWorker:
    """A fresh interpreter in its own session (a hard kill takes everything train.py started)."""

    def __init__(self, trial_dir: Path, started: float):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ARENA_HARNESS_STARTED": repr(started),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        # -P: the trial's train.py sits in the working directory and must not shadow the `train` package.
        command = [sys.executable, "-P", "-m", "train.harness", "--worker", str(trial_dir)]
        with open(trial_dir / LOG_FILE, "ab") as log:
            self.popen = subprocess.Popen(command, cwd=trial_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def wait(self, deadline: float | None) -> int | None:
        """The worker's exit code (negative: killed by that signal), or None at the deadline."""
        try:  # through the Popen, which would otherwise reap the worker behind our back when collected
            return self.popen.wait(None if deadline is None else max(deadline - time.time(), 0))
        except subprocess.TimeoutExpired:
            return None


class _ForkedWorker:
    """A fork of this process: it starts with torch already imported, in its own session, and dies
    with its parent. It never shares memory back, so nothing train.py does reaches the evaluation
    here."""

    def __init__(self, trial_dir: Path, started: float):
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                _become_own_process(trial_dir / LOG_FILE)
                os.environ["ARENA_HARNESS_STARTED"] = repr(started)
                worker_main(trial_dir)
            finally:
                os._exit(1)  # worker_main leaves through os._exit(0); anything else is a crash
        self.code = None

    def wait(self, deadline: float | None) -> int | None:
        """The worker's exit code (negative: killed by that signal), or None at the deadline."""
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
            elif time.time() >= deadline:
                return None
            else:
                time.sleep(0.02)
        return self.code


def _become_own_process(output: Path | str) -> None:
    """Make a fresh fork what a newly started process would be: its own session (a group kill takes
    all it starts), output appended to `output` line by line, no stdin, default signal handlers, and
    new `random`/numpy global states. train.py seeds torch and its batches through `run`, but what it
    leaves unseeded must not repeat across trials."""
    import random

    import numpy

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
    random.seed()
    numpy.random.seed()


def serve() -> None:
    """A warm harness for one slot of the local launcher: torch is imported once, then each trial
    directory read from stdin runs in a fork, exactly as `python -m train.harness TRIAL_DIR` would
    run it, and its pid is written back. It never runs a trial's code itself, so a trial cannot
    reach the next one through it. EOF on stdin (the launcher closed or died) ends it."""
    warm_up()
    if not fork_safe():
        sys.exit("error: --serve forks trials, which a GPU runtime does not survive: "
                 "run `python -m train.harness TRIAL_DIR` per trial instead")
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
                _become_own_process("stdout.log")
                _print_summary(run_trial(trial_dir))
                code = 0
            except BaseException:  # noqa: BLE001 - a harness bug is in stdout.log; the launcher sees no result
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(running)  # the fork holds it now, for as long as any process of the trial lives
        print(pid, flush=True)


def hold_running_lock(trial_dir: str | os.PathLike) -> int:
    """Lock the trial's running.lock before forking it, so that the trial is marked live from its
    first instant: a launcher killed between this fork and hearing the pid must not conclude on
    restart that the trial never started. The descriptor (and with it the flock) passes to every
    process the trial forks."""
    import fcntl

    from train.contract import RUNNING_LOCK

    fd = os.open(Path(trial_dir) / RUNNING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):  # already held: a launcher bug, but the trial still runs
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _evaluate(trial_dir: Path, spec: dict, report: dict) -> dict:
    """val_bpb of the trained weights, by prepare.py's code, with train.py loaded only to rebuild
    the model; any change train.py makes to the evaluation's libraries voids the score."""
    import torch

    from train import prepare

    objective = spec["objective"]
    _set_threads(torch)
    evaluate_bpb = prepare.evaluate_bpb  # held before train.py is imported
    data = prepare.prepare(objective["corpus"], objective["vocab_size"], objective.get("cache_dir"))
    device = torch.device(report["device_type"])
    seq_len = report["seq_len"]
    watched = _watched_namespaces()
    before = [(name, ns, dict(vars(ns))) for name, ns in watched]

    module = _load_train_module(trial_dir / "train.py")
    model = _build(module, data.vocab_size, spec["seed"], device)
    weights = torch.load(trial_dir / WEIGHTS_FILE, map_location=device, weights_only=True)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        why = str(e).splitlines()[0]
        raise TrialFailed("invalid", f"the trained weights do not fit build_model(): {why}") from None
    model.eval()
    _check_causal(model, data, seq_len, device)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def model_fn(idx):
        with autocast:
            return model(idx)

    t0 = time.time()
    scores = evaluate_bpb(model_fn, data, objective["eval_tokens"], seq_len, objective["eval_batch_size"], device)
    eval_seconds = time.time() - t0
    patched = [f"{name}.{key}" for name, ns, saved in before for key, value in saved.items()
               if vars(ns).get(key, _MISSING) is not value]
    if patched:
        raise TrialFailed("invalid", f"integrity: train.py patched {', '.join(sorted(patched)[:5])}")
    val_bpb = scores["val_bpb"]
    if not math.isfinite(val_bpb):
        raise TrialFailed("nan", f"val_bpb is {val_bpb}")
    _log(trial_dir, f"harness: eval of {scores['tokens']} tokens at seq_len {seq_len} in {eval_seconds:.2f} s")
    return {"val_bpb": val_bpb, "mfu": _mfu(report), "eval_seq_len": seq_len, "eval_seconds": round(eval_seconds, 3)}


_MISSING = object()


def _watched_namespaces() -> list:
    """Everything the evaluation's numbers flow through, by name."""
    import builtins

    import numpy
    import torch
    import torch.nn.functional

    from train import prepare

    return [
        ("torch", torch), ("torch.nn.functional", torch.nn.functional), ("torch.Tensor", torch.Tensor),
        ("torch.nn.Module", torch.nn.Module), ("torch._C._nn", torch._C._nn),
        ("torch._C.TensorBase", torch._C.TensorBase),
        ("numpy", numpy), ("numpy.ndarray", numpy.ndarray), ("math", math), ("builtins", builtins),
        ("train.prepare", prepare), ("train.prepare.DataSpec", prepare.DataSpec),
        ("train.harness", sys.modules[__name__]),
    ]


def _check_causal(model, data, seq_len: int, device) -> None:
    """Logits at position t may depend only on tokens <= t of their own row: change the second half
    of row 0 and all of row 1, and row 0's first half must not move."""
    import torch

    tokens = torch.as_tensor(data.val_tokens()[: 2 * seq_len].astype("int64"), device=device).view(2, seq_len)
    changed = tokens.clone()
    t = seq_len // 2
    generator = torch.Generator(device="cpu").manual_seed(0)
    changed[0, t + 1:] = torch.randint(data.vocab_size, (seq_len - t - 1,), generator=generator).to(device)
    changed[1] = torch.randint(data.vocab_size, (seq_len,), generator=generator).to(device)
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    if not isinstance(a, torch.Tensor) or a.dim() != 3 or tuple(a.shape[:2]) != (2, seq_len):
        raise TrialFailed("invalid", f"model(idx [2, {seq_len}]) must return logits [2, {seq_len}, V]")
    if not torch.isfinite(a).all():
        raise TrialFailed("nan", "the trained model outputs non-finite logits")
    drift = (a[0, : t + 1].float() - b[0, : t + 1].float()).abs().max().item()
    if not drift <= 1e-3:
        raise TrialFailed("invalid", f"non-causal model: logits at positions <= {t} moved by {drift:.3g} "
                                     "when later tokens or other rows changed")


def _mfu(report: dict):
    name = report.get("device") or ""
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    rate = report.get("tokens_per_second")
    if report.get("device_type") != "cuda" or peak is None or not rate:
        return None
    return round(6 * report["matmul_params"] * rate / peak, 4)


# ----------------------------------------------------------------------------------------------
# The worker: import train.py, build, train within the budget, save the weights


def worker_main(trial_dir) -> None:
    trial_dir = Path(trial_dir)
    _die_with_parent()
    report, run = {"status": "crash"}, None
    try:
        import torch

        from train import prepare

        _set_threads(torch)
        spec = json.loads((trial_dir / TRIAL_FILE).read_text())
        objective, seed = spec["objective"], spec["seed"]
        data = prepare.prepare(objective["corpus"], objective["vocab_size"], objective.get("cache_dir"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        module = _load_train_module(trial_dir / "train.py")
        model = _build(module, data.vocab_size, seed, device)
        embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        num_params = sum(p.numel() for p in model.parameters())
        run = Run(device=device, vocab_size=data.vocab_size, train_tokens=data.train_tokens(), seed=seed,
                  budget_kind=objective["budget_kind"], budget=objective["budget"],
                  warmup_steps=objective["warmup_steps"])
        startup = time.time() - float(os.environ.get("ARENA_HARNESS_STARTED", time.time()))
        print(f"worker: {num_params:,} parameters on {device}, budget {objective['budget']} "
              f"{objective['budget_kind']}, ready {startup:.2f} s after the harness started", flush=True)
        module.train(model, run)  # its return value is ignored
        if run.num_steps == 0 or run.seq_len is None:
            raise TrialFailed("invalid", "train() returned without drawing a batch and calling run.step()")
        weights = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
        torch.save(weights, trial_dir / WEIGHTS_FILE)
        report = {"status": "ok", "num_params": num_params, "matmul_params": num_params - embedding}
    except BaseException as e:  # noqa: BLE001 - every way train.py can end is a status
        error = str(e) if isinstance(e, TrialFailed) else _tail(traceback.format_exc())
        report = {"status": _classify(e), "error": error}
        print(report["error"], flush=True)
    report.update(run.stats() if run else {})
    report.update(_device_facts())
    _write_json(trial_dir / WORKER_FILE, report)
    sys.stdout.flush()
    os._exit(0)  # threads train.py left behind must not keep the worker alive until the hard limit


def _classify(e: BaseException) -> str:
    import torch

    if isinstance(e, TrialFailed):
        return e.status
    if isinstance(e, SyntaxError):
        return "invalid"
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "can't allocate memory"))
    ):
        return "oom"
    return "crash"


def _device_facts() -> dict:
    import resource

    import torch

    facts = {"torch_version": torch.__version__, "device": _device_name(torch)}
    if torch.cuda.is_available():
        facts.update(device_type="cuda", peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
    else:  # peak resident memory of the worker, Linux reports KiB
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        facts.update(device_type="cpu", peak_memory_mb=round(peak_kib / 1024, 1))
    return facts


def _device_name(torch) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _load_train_module(path: Path):
    spec = importlib.util.spec_from_file_location("arena_trial_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("build_model", "train"):
        if not callable(getattr(module, name, None)):
            raise TrialFailed("invalid", f"train.py does not define {name}()")
    return module


def _build(module, vocab_size: int, seed: int, device):
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        model = module.build_model(vocab_size)
    if not isinstance(model, torch.nn.Module):
        raise TrialFailed("invalid", f"build_model() returned {type(model).__name__}, not a torch.nn.Module")
    return model.to(device)


def _set_threads(torch) -> None:
    """The launcher gives each slot its share of the cores through the environment."""
    threads = os.environ.get("ARENA_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _die_with_parent() -> None:
    """The worker has its own process group, so a launcher that kills the harness's group would miss
    it: ask Linux to kill it when the parent dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ----------------------------------------------------------------------------------------------


def _tail(text: str, lines: int = 30, chars: int = 4000) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


def _log(trial_dir: Path, line: str) -> None:
    with open(trial_dir / LOG_FILE, "a") as log:
        log.write(line + "\n")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _print_summary(result: dict) -> None:
    summary = ("status", "val_bpb", "num_steps", "training_seconds", "total_seconds")
    print(json.dumps({k: result.get(k) for k in summary}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--serve"]:
        serve()
        return
    if len(args) == 2 and args[0] == "--worker":  # a spawned worker (see _SpawnedWorker)
        worker_main(args[1])
        return
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m train.harness TRIAL_DIR   (TRIAL_DIR holds train.py and trial.json)\n"
                 "       python -m train.harness --serve     (warm: trial directories on stdin, pids on stdout)")
    if not Path(args[0]).is_dir():
        sys.exit(f"error: no trial directory {args[0]}")
    _print_summary(run_trial(args[0]))


if __name__ == "__main__":
    main()
