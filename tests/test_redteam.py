"""Red-team attacks on the trusted score path, beyond the attack classes of tests/test_attacks.py.

Each end-to-end attack is the tiny baseline plus a few lines an adversarial agent could write, run
through the real harness (`python -m train.harness TRIAL_DIR`, as Slurm runs it) and read back as
the launchers read it (signature checked). Every one of them, or the class it stands for, got
through once; the comment names what closed it, and the test keeps it closed:

- model servers that were handed validation batches talked to each other (System V shared memory,
  POSIX record locks, page-cache residency, holes in an inherited log descriptor) and answered the
  causality probe from the partner's batch: a next-token peek scored 0.12-0.23 bits per byte, status
  ok. No process that runs candidate code holds validation text any more: the model crosses to the
  scorer as a pure tensor program, and Python in forward (the channel's code) does not export;
- a model file that is a symlink (to any file of the host, which the trusted harness read as its
  own), a FIFO (the harness blocked on it), a file declaring a multi-GB tensor in a few bytes (the
  harness allocated it and died), or one rewritten by a survivor while it is read;
- step lines printed into run.log, which the live display and MLflow's loss curve read as the
  harness's (they now read steps.log, which only the harness writes);
- a candidate training at sequence length 4, which made the harness fork 256 model servers;
- training the clock does not see: in a warm-up step on the batches drawn before it, and after the
  last step before train() returns (the ledger tests below, with the ledger's own clock);
- programs that made the trusted scorer hold far more memory than max_memory_mb, status ok (a
  view that outlives its base, sizes that grow only at the prefix-only runs' lengths, an einsum's
  hidden product), a loss no float holds (a harness error), a 64 MB JSON header (1.6 GB parsed
  before any check), a worker that never reads the batch it asked for (the harness blocked past its
  hard limit for good), a program the CPU evaluates once a row per operator (minutes of scoring,
  status ok), a worker that asks for a stream or says "exporting" in every message (the harness's
  memory, its run.log), and a model that peeks at one fixed position, which the shared prefix
  lengths rarely check (the red team of issue 20; the unit tests in tests/test_graph.py cover the
  rest); two concurrent trials talking through file locks and file events (the sandbox tests below).
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launchers.base import read_result
from tests.conftest import ROOT, make_trial, tiny_source
from tests.test_sandbox import LEVELS, both, fork_running, world  # noqa: F401 - `world` is a fixture used here
from train import sandbox
from train.contract import LOG_FILE, RESULT_FILE
from train.integrity import ensure_study_key
from train.trainer import HANDOVER_S, Ledger, warmup_limit

EVAL = {"eval_tokens": 512}  # 8 rows of 64
HARNESS_TIMEOUT_S = 600  # a hang of the trusted harness is a failure, not a stuck suite


def _in_forward(objective: dict, code: str, at_import: str = "") -> str:
    """`code` runs at each forward call (training, and once when the worker exports the model);
    `idx` is the batch, and a non-None `_logits` it sets replaces the model's output. `at_import`
    runs when train.py is imported."""
    source = tiny_source(objective)
    forward = "    def forward(self, idx):\n"
    body = "".join(f"        {line}\n" for line in ("_logits = None\n" + code.strip("\n")).splitlines())
    source = source.replace(forward, forward + body + "        if _logits is not None:\n            return _logits\n", 1)
    return source + "\n" + at_import


def _at_logits(objective: dict, code: str) -> str:
    """`code` runs in forward right after the baseline computes `logits` (which it may replace):
    with `if not self.training:` only when the worker exports the model, so only in the program
    the scorer evaluates."""
    source = tiny_source(objective)
    anchor = "        logits = self.lm_head(norm(x)).float()\n"
    body = "".join(f"        {line}\n" for line in code.strip("\n").splitlines())
    return source.replace(anchor, anchor + body, 1)


def _in_train(objective: dict, code: str) -> str:
    """`code` runs at the start of train()."""
    return tiny_source(objective, hook=code)


def _exporting(code: str) -> str:
    """train() code that makes the worker's exporter run `code` (a lambda body over `path`) instead
    of writing the model: the candidate owns its process, the exporter included."""
    return ("import builtins as _b, train.export as _E\n"
            f"_b._arena_write = lambda path: {code}\n"
            "_E.export_model.__code__ = (lambda model, seq_len, path: _arena_write(path)).__code__\n")


# The forgery a pair of model servers once carried: logits that put 25 nats on the next token of
# the row (the target, read from the input), answered from a partner's batch where the two share it.
PEEK = """
if not self.training:
    import numpy as _np
    _B, _T = idx.shape
    _me = idx.numpy()
    def _peek(x):
        _out = torch.zeros(_B, _T, self.lm_head.out_features)
        _out[:, :-1].scatter_(-1, torch.as_tensor(x)[:, 1:, None], 25.0)
        return _out
    _partner = _find_partner(_me)
    _logits = _peek(_me)
    if _partner is not None:
        _diff = _partner != _me
        _first = _np.where(_diff.any(1), _diff.argmax(1), _T)
        _keep = torch.as_tensor(_np.arange(_T)[None, :] < _first[:, None])
        _logits = torch.where(_keep[..., None], _peek(_partner), _logits)
    else:
        _publish(_me)
"""

SYSV_CHANNEL = """
import ctypes as _c, numpy as _np
_libc = _c.CDLL(None, use_errno=True)
_libc.shmat.restype = _c.c_void_p
def _segment():
    _id = _libc.shmget(0x5EED0000 + SEED, 1 << 20, 0o1666)
    if _id < 0:
        return None
    return _np.frombuffer((_c.c_char * (1 << 20)).from_address(_libc.shmat(_id, None, 0)), dtype=_np.int64)
def _find_partner(me):
    mem = _segment()
    if mem is None:
        return None
    for k in range(int(mem[0])):
        prev = mem[1 + k * me.size: 1 + (k + 1) * me.size].reshape(me.shape)
        if (prev[:, 0] == me[:, 0]).all():
            return prev.copy()
    return None
def _publish(me):
    mem = _segment()
    if mem is not None:
        n = int(mem[0])
        mem[1 + n * me.size: 1 + (n + 1) * me.size] = me.reshape(-1)
        mem[0] = n + 1
"""

# What the live display and MLflow's loss curve would have drawn: a loss no model of this size gets.
FORGED_STEPS = """
for _step in (1, 500, 999):
    print(f"step={_step} loss=0.01 progress={_step / 999:.3f} training_seconds=0.01", flush=True)
"""

# A setsid'd grandchild that keeps truncating and rewriting the exported model while the harness
# would read it: the harness kills the whole tree first, so what it reads holds still.
SURVIVOR_REWRITES_THE_MODEL = """
import os as _o, time as _tm
if _o.fork() == 0:
    _o.setsid()
    if _o.fork() == 0:
        _end = _tm.time() + 60
        while _tm.time() < _end:
            try:
                with open("model.arena", "r+b") as _f:
                    _f.truncate(12)
                    _f.write(b"x" * 4096)
            except OSError:
                pass
    _o._exit(0)
"""


# The scorer's memory: what the exported program makes the trusted harness hold, beyond what the
# objective's max_memory_mb (64 MB in these trials) says it may. Each adds nothing to the logits.
VIEWS_OUTLIVE_THEIR_BASES = """
if not self.training:
    _keep = [torch.full((12 << 20,), 1.0, device=idx.device)[:1] for _ in range(10)]  # 10 x 48 MB, 1 float each
    logits = logits + torch.stack(_keep).sum() * 0
"""
GROWS_ONLY_AT_PREFIX_LENGTHS = """
if not self.training:
    _short = (2 * EVAL_SEQ_LEN - 1 - idx.size(1)) // EVAL_SEQ_LEN  # 1 below the full length, 0 at it
    _wide = idx[:, :1].float().expand(1, _short * (7 << 20) + 2).contiguous()  # 28 MB a row, prefix runs only
    logits = logits + _wide.sum() * 0
"""
EINSUM_OF_THREE = """
if not self.training:
    _col, _row = torch.ones(8192, 1, device=idx.device), torch.ones(1, 8192, device=idx.device)
    logits = logits + torch.einsum("ab,bc,cd->ad", _col, _row, _col).sum() * 0  # an [8192, 8192] product inside
"""
# The worker owns its end of the socket: a loss no float holds.
HUGE_LOSS = "import sys\nsys._getframe(1).f_locals['run']._ask({'op': 'step', 'loss': 10 ** 400})"
# Ask for a 128 MB batch and never read it: the harness's blocking send held it past its hard limit.
NEVER_READS = """import sys, time
from train import wire
_run = sys._getframe(1).f_locals['run']
wire.send(_run._sock, {'op': 'batches', 'batch_size': 4096, 'seq_len': 4095})
wire.recv(_run._sock)
wire.send(_run._sock, {'op': 'next', 'stream': 0})
time.sleep(3600)"""
# The exported program, then 19,900 attention operators on an [8, 1, T, 8] slice of the logits
# appended to it: little work by the count (2e7 a token), but the CPU's attention kernel has no
# vmap batch rule, so each runs once a row. 2,000 of them took 239 s of the trusted harness's time
# (status ok) for a tiny trial whose honest evaluation takes 4 s, and 40-240 s as the load varied:
# ten times as many leave no doubt that the scoring outlasts the 90 s hard limit.
SLOW_TO_SCORE = """import builtins as _b, json as _j, struct as _s, types as _t, train.export as _E
_export = _t.FunctionType(_E.export_model.__code__, _E.export_model.__globals__)
def _slow(model, seq_len, path):
    _export(model, seq_len, path)
    raw = open(path, 'rb').read()
    (n,) = _s.unpack('<Q', raw[:8])
    head, payload = _j.loads(raw[8:8 + n]), raw[8 + n:]
    out, nodes, last = head['output'], head['nodes'], 'q'
    nodes += [{'name': 'q0', 'op': 'aten.slice.Tensor', 'args': [{'ref': out}, 2, 0, 8], 'kwargs': {}},
              {'name': 'q', 'op': 'aten.unsqueeze.default', 'args': [{'ref': 'q0'}, 1], 'kwargs': {}}]
    for i in range(19900):
        nodes.append({'name': f'a{i}', 'op': 'aten.scaled_dot_product_attention.default',
                      'args': [{'ref': last}, {'ref': 'q'}, {'ref': 'q'}], 'kwargs': {'is_causal': True}})
        last = f'a{i}'
    nodes += [{'name': 's', 'op': 'aten.sum.default', 'args': [{'ref': last}], 'kwargs': {}},
              {'name': 'z', 'op': 'aten.mul.Scalar', 'args': [{'ref': 's'}, 0.0], 'kwargs': {}},
              {'name': 'slow', 'op': 'aten.add.Tensor', 'args': [{'ref': out}, {'ref': 'z'}], 'kwargs': {}}]
    head['output'] = 'slow'
    head = _j.dumps(head).encode()
    open(path, 'wb').write(_s.pack('<Q', len(head)) + head + payload)
_b._arena_slow = _slow
_E.export_model.__code__ = (lambda model, seq_len, path: _arena_slow(model, seq_len, path)).__code__"""
# 64 MB of empty JSON lists: 1.6 GB of the harness's memory once parsed.
JSON_BOMB = ("(lambda b: open(path, 'wb').write(__import__('struct').pack('<Q', len(b)) + b))"
             "(b'{\"nodes\": [' + b'[],' * ((64 << 20) // 3 - 8) + b'[]]}')")


def _bomb_file() -> str:
    """A model file of a few hundred bytes declaring an 8 GiB tensor."""
    head = json.dumps({"format": "arena-graph/1", "inputs": [{"name": "idx", "input": True}], "nodes": [],
                       "output": "idx", "tensors": {"w": {"dtype": "float32", "shape": [1 << 31],
                                                          "offset": 0, "nbytes": 8 << 30}}}).encode()
    return repr(struct.pack("<Q", len(head)) + head + b"\0" * 64)


def _landlock_level() -> bool:
    try:
        return sandbox.check_level("landlock") == "landlock"
    except sandbox.SandboxUnavailable:
        return False


class Redteam:
    """Every end-to-end attack of this file, run once in one study, two at a time."""

    def __init__(self, study: Path, objective: dict):
        self.study = study
        ensure_study_key(study)
        self.stolen = study / "stolen-model.arena"
        _save_uniform_model(objective, self.stolen)
        constants = f"\nSEED = 1\nSTOLEN = {str(self.stolen)!r}\n"
        small_memory = {"eval_limits": {**objective["eval_limits"], "max_memory_mb": 64}}
        attacks = {  # name -> (source, objective overrides, harness environment)
            "python-side-channel-in-forward-landlock": (_in_forward(objective, PEEK, SYSV_CHANNEL + constants),
                                                        {"sandbox": "landlock"}, {}),
            "python-side-channel-in-forward": (_in_forward(objective, PEEK, SYSV_CHANNEL + constants), {}, {}),
            "model-symlink-to-a-host-file": (_in_train(objective, _exporting("__import__('os').symlink(STOLEN, path)"))
                                             + constants, {}, {}),
            "model-fifo": (_in_train(objective, _exporting("__import__('os').mkfifo(path)")), {}, {}),
            "model-size-bomb": (_in_train(objective, _exporting(f"open(path, 'wb').write({_bomb_file()})")), {}, {}),
            "model-rewritten-by-a-survivor": (_in_train(objective, SURVIVOR_REWRITES_THE_MODEL), {}, {}),
            "forged-step-lines-in-run-log": (_in_train(objective, FORGED_STEPS), {}, {}),
            "training-at-sequence-length-4": (tiny_source({**objective, "knobs": {**objective["knobs"], "SEQ_LEN": 4}}),
                                              {}, {}),
            "views-outlive-their-bases": (_at_logits(objective, VIEWS_OUTLIVE_THEIR_BASES), small_memory, {}),
            "memory-grows-only-at-prefix-lengths": (
                _at_logits(objective, GROWS_ONLY_AT_PREFIX_LENGTHS.replace("EVAL_SEQ_LEN", str(objective["eval_seq_len"]))),
                {**small_memory, "eval_tokens": 2048, "eval_batch_size": 32}, {}),
            "einsum-of-three-operands": (_at_logits(objective, EINSUM_OF_THREE), small_memory, {}),
            "a-loss-no-float-holds": (_in_train(objective, HUGE_LOSS), {}, {}),
            "a-64-mb-header": (_in_train(objective, _exporting(JSON_BOMB)), {}, {}),
            "a-worker-that-never-reads-its-batch": (_in_train(objective, NEVER_READS), {"hard_limit_s": 20}, {}),
            "a-program-slow-to-score": (_in_train(objective, SLOW_TO_SCORE), {"hard_limit_s": 90}, {}),
        }
        if not _landlock_level():
            del attacks["python-side-channel-in-forward-landlock"]
        self.trials, self.runs = {}, {}
        for index, (name, (source, overrides, env)) in enumerate(attacks.items()):
            trial = make_trial(study, index, objective, source, **{**EVAL, **overrides})
            self.trials[name] = (trial, env)
        with ThreadPoolExecutor(2) as pool:
            self.runs = dict(zip(self.trials, pool.map(self._harness, self.trials.values())))

    @staticmethod
    def _harness(trial_and_env) -> subprocess.CompletedProcess:
        trial, env = trial_and_env
        return subprocess.run([sys.executable, "-P", "-m", "train.harness", trial.directory], cwd=trial.directory,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                              timeout=HARNESS_TIMEOUT_S)

    def result(self, name: str):
        trial, _ = self.trials[name]
        run = self.runs[name]
        assert run.returncode == 0 and (Path(trial.directory) / RESULT_FILE).exists(), \
            f"the trusted harness died ({run.returncode}): {run.stderr[-2000:]}"
        return read_result(trial.directory)


def _save_uniform_model(objective: dict, path: Path) -> None:
    """An exported model that fits the tiny objective and scores exactly uniform (a zero unembedding),
    in a file only the trusted side can read: if a trial scores this, the harness read a host file."""
    import torch

    from train.export import export_model

    namespace: dict = {}
    exec(compile(tiny_source(objective), "train.py", "exec"), namespace)  # our own baseline
    model = namespace["build_model"](objective["vocab_size"])
    with torch.no_grad():
        model.lm_head.weight.zero_()
    export_model(model, objective["eval_seq_len"], path)
    os.chmod(path, 0o600)


@pytest.fixture(scope="module")
def redteam(tmp_path_factory, objective):
    return Redteam(tmp_path_factory.mktemp("redteam") / "study", objective)


@pytest.mark.parametrize("name", ["python-side-channel-in-forward-landlock", "python-side-channel-in-forward"])
def test_python_in_forward_that_once_carried_a_side_channel_does_not_cross_to_the_scorer(redteam, name):
    if name not in redteam.trials:
        pytest.skip("this host has no landlock level")
    result = redteam.result(name)
    assert result.status == "invalid" and "torch.export could not export" in result.error, (result.status, result.error)
    assert result.val_bpb is None


@pytest.mark.parametrize("name", ["model-symlink-to-a-host-file", "model-fifo"])
def test_the_harness_reads_only_a_regular_model_file_of_the_scratch(redteam, name):
    result = redteam.result(name)
    assert result.status == "invalid" and "not a regular file of the scratch" in result.error, (result.status, result.error)
    assert result.val_bpb is None


def test_a_model_file_declaring_gigabytes_in_a_few_bytes_is_invalid_and_allocates_nothing(redteam):
    result = redteam.result("model-size-bomb")
    assert result.status == "invalid" and "are not in the file" in result.error, (result.status, result.error)
    assert json.loads((Path(redteam.trials["model-size-bomb"][0].directory) / RESULT_FILE).read_text())[
        "trusted_cpu_seconds"] < 60  # a figure of the kernel's, not a timing assertion: nothing of 8 GiB was made


def test_a_survivor_rewriting_the_model_is_dead_before_the_harness_reads_it(redteam):
    result = redteam.result("model-rewritten-by-a-survivor")  # the harness wrote its signed result
    assert result.status in ("ok", "invalid"), (result.status, result.error)
    assert "harness error" not in (result.error or "")


def test_step_lines_the_candidate_prints_reach_no_display_and_no_loss_curve(redteam):
    from study.mlflow_content import loss_curve
    from study.progress import trial_progress

    trial, _ = redteam.trials["forged-step-lines-in-run-log"]
    assert redteam.result("forged-step-lines-in-run-log").status == "ok"
    assert "step=999 loss=0.01" in (Path(trial.directory) / LOG_FILE).read_text()  # the forgery was printed
    curve = loss_curve(trial)
    assert curve and max(step for step, _, _ in curve) == trial.objective["budget"]  # the harness's own steps
    assert min(loss for _, loss, _ in curve) > 1.0
    assert trial_progress(trial.directory)["step"] == trial.objective["budget"]


def test_training_at_sequence_length_4_changes_nothing_of_the_evaluation(redteam):
    """The evaluation's geometry is the objective's: 8 rows of 64, whatever train() asked batches of."""
    trial, _ = redteam.trials["training-at-sequence-length-4"]
    result = redteam.result("training-at-sequence-length-4")
    assert result.status == "ok", result.error
    log = (Path(trial.directory) / LOG_FILE).read_text()
    assert "batches of 4 x 4 tokens" in log and "8 rows of 64" in log


@pytest.mark.parametrize("name", ["views-outlive-their-bases", "memory-grows-only-at-prefix-lengths",
                                  "einsum-of-three-operands"])
def test_the_scorer_holds_no_more_memory_than_the_objective_allows(redteam, name):
    """Each of these programs passed every check of max_memory_mb = 64 MB and scored status ok while
    the trusted harness held far more: ten one-float slices of 48 MB tensors (818 MB resident), a
    28 MB tensor a row at prefix lengths only, 16 rows at once (980 MB), an einsum's hidden
    [8192, 8192] product (256 MB)."""
    result = redteam.result(name)
    assert result.status == "invalid" and "MB of intermediate tensors" in result.error, (result.status, result.error)
    assert result.val_bpb is None


def test_a_loss_no_float_holds_ends_the_trial_as_nan_not_as_a_harness_error(redteam):
    result = redteam.result("a-loss-no-float-holds")
    assert result.status == "nan" and "harness error" not in result.error, (result.status, result.error)


def test_a_model_file_with_a_64_mb_header_is_refused_before_it_is_parsed(redteam):
    result = redteam.result("a-64-mb-header")
    assert result.status == "invalid" and "header of" in result.error, (result.status, result.error)


def test_a_worker_that_never_reads_the_batch_it_asked_for_is_a_timeout_at_the_hard_limit(redteam):
    result = redteam.result("a-worker-that-never-reads-its-batch")  # the harness wrote its result
    assert result.status == "timeout" and "half-way through a message" in result.error, (result.status, result.error)


def test_a_program_the_scorer_cannot_finish_within_the_hard_limit_is_a_timeout(redteam):
    """The hard limit covers the whole trial: the scorer stops a program at it, with the harness's
    own signed result, instead of computing on until the launcher's backstop kills it unsigned."""
    result = redteam.result("a-program-slow-to-score")
    assert result.status == "timeout" and "could not be checked and scored" in result.error, (result.status,
                                                                                             result.error)
    assert result.val_bpb is None


@pytest.mark.parametrize("level", LEVELS)
def test_no_system_v_ipc_or_message_queue_outlives_a_sandboxed_process(world, level):  # noqa: F811
    def attack(_):
        libc = ctypes.CDLL(None, use_errno=True)
        made = {}
        for name, call in (("shm", lambda: libc.shmget(0, 4096, 0o1600)), ("msg", lambda: libc.msgget(0, 0o1600)),
                           ("sem", lambda: libc.semget(0, 1, 0o1600)),
                           ("mq", lambda: libc.mq_open(b"/arena-redteam", os.O_CREAT | os.O_RDWR, 0o600, None))):
            made[name] = [call(), ctypes.get_errno()]
        # the control leaves nothing behind either
        for name, rm in (("shm", lambda i: libc.shmctl(i, 0, None)), ("msg", lambda i: libc.msgctl(i, 0, None)),
                         ("sem", lambda i: libc.semctl(i, 0, 0))):
            if made[name][0] >= 0:
                rm(made[name][0])
        if made["mq"][0] >= 0:
            libc.mq_unlink(b"/arena-redteam")
        return made

    ran = world.run(level, attack)
    assert ran.code == 0, ran
    created = {name for name, (value, _) in ran.report.items() if value >= 0}
    if both(level):
        assert created == set(), ran.report
        assert all(errno == 1 for _, errno in ran.report.values()), ran.report  # EPERM from seccomp
    else:
        assert created == {"shm", "msg", "sem", "mq"}, ran.report


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to one")
@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_stays_on_the_cores_its_slot_was_pinned_to(world, level):  # noqa: F811
    """The local launcher pins each slot to its cores; os.sched_setaffinity(0, every core) took
    the siblings' CPU, and with it their compute under a seconds budget."""
    every = os.sched_getaffinity(0)
    one = {min(every)}

    def attack(_):
        try:
            os.sched_setaffinity(0, every)
            errno = 0
        except OSError as e:
            errno = e.errno
        return {"errno": errno, "cores": sorted(os.sched_getaffinity(0))}

    os.sched_setaffinity(0, one)  # the fork inherits the slot's pinning, as the harness's children do
    try:
        ran = world.run(level, attack)
    finally:
        os.sched_setaffinity(0, every)
    assert ran.code == 0, ran
    if both(level):
        assert ran.report == {"errno": 1, "cores": sorted(one)}
    else:
        assert ran.report["cores"] == sorted(every)


# ----------------------------------------------------------------------------------------------
# Training the clock does not see. The ledger is the trusted count; its clocks are given to it.


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", ["seconds", "cpu_seconds"])
def test_a_warm_up_step_that_trains_for_long_is_counted_past_its_allowance(kind):
    clock = FakeClock()
    objective = {"budget_kind": kind, "budget": 300.0}
    limit = warmup_limit(objective)
    assert limit == 60.0  # min(60 s, 20% of the budget)
    timing = {"clock": clock} if kind == "seconds" else {"cpu_seconds": clock}
    ledger = Ledger(kind, 300.0, 10, 512, warmup_limit_s=limit, **timing)
    ledger.start()
    assert ledger.draw(4, 64) is None
    clock.now = 250.0  # the first warm-up step trained for 250 s on the batches it drew
    assert ledger.progress == pytest.approx(190 / 300)  # everything past the allowance counts
    for _ in range(9):
        ledger.draw(4, 64)
        ledger.step(5.0)
    clock.now = 400.0
    assert ledger.draw(4, 64) is None and ledger.step(5.0)  # 400 - 60 s: the budget is spent
    stats = ledger.stats()
    assert stats[f"{'training_' if kind == 'seconds' else 'cpu_'}seconds"] == pytest.approx(340.0)
    if kind == "seconds":
        assert stats["warmup_seconds"] == 400.0  # the warm-up ended with its tenth step


def test_a_warm_up_that_trains_past_budget_and_allowance_is_stopped():
    clock = FakeClock()
    ledger = Ledger("seconds", 3.0, 1, 512, clock=clock, warmup_limit_s=warmup_limit(
        {"budget_kind": "seconds", "budget": 3.0}))
    ledger.start()
    ledger.draw(4, 64)
    clock.now = 0.6 + 3.0 + 0.1  # allowance, budget: spent, without a single step
    assert ledger.overdue() is None
    clock.now += HANDOVER_S + 0.1
    assert "past its 3.0 seconds budget" in ledger.overdue()


def test_a_steps_budget_has_no_warm_up_allowance_to_abuse():
    assert warmup_limit({"budget_kind": "steps", "budget": 600}) is None


def test_training_after_the_budget_is_stopped_within_the_hand_over():
    clock = FakeClock()
    ledger = Ledger("seconds", 3.0, 0, 512, clock=clock, warmup_limit_s=0.6)
    ledger.start()
    ledger.draw(4, 64)
    clock.now = 3.5
    assert ledger.step(5.0)  # budget spent: train() must return now
    clock.now += HANDOVER_S - 1
    assert ledger.overdue() is None
    clock.now += 2  # it kept training on the batches it had kept
    assert "did not return within" in ledger.overdue()
    assert HANDOVER_S <= 10  # 30 s of uncounted training was a 10x overrun of a 3 s budget


def test_a_knob_that_is_a_huge_power_is_no_knob_and_costs_no_time():
    """The orchestrator reads every candidate's knobs (journal, MLflow params): 9**9**9 in an
    agent's train.py kept it computing for minutes; such a value is not a knob (as a computed one)."""
    from train.knobs import read_knobs

    assert read_knobs("DEPTH = 9**9**9\nBATCH = 2**19\nLR = 2.0**-0.5\n") == {"BATCH": 524288, "LR": 2.0 ** -0.5}


def test_a_knob_made_of_huge_factors_is_no_knob_and_its_trial_folder_is_written(tmp_path, objective):
    """2**4000 * 2**4000 * 2**4000 * 2**4000 passed the power bound factor by factor, and the
    orchestrator died of a ValueError writing trial.json (JSON refuses ints of 4300+ digits)."""
    from study.records import Candidate, Trial
    from study.trialdir import write_trial_dir
    from train.knobs import read_knobs

    source = tiny_source(objective).replace("DEPTH = 1", "DEPTH = 2**4000 * 2**4000 * 2**4000 * 2**4000")
    knobs = read_knobs(source)
    assert "DEPTH" not in knobs and knobs["HEAD_DIM"] == 16
    assert read_knobs("A = 2**62 + 2**62\nB = -(2**63)\nC = 2**62\n") == {"C": 2 ** 62}  # every value fits an int64
    trial = Trial(trial_id="t0000", index=0, candidate=Candidate(source=source, knobs=knobs), objective=objective, seed=1)
    directory = write_trial_dir(tmp_path / "trials" / "t0000", trial)
    assert json.loads((directory / "trial.json").read_text())["trial_id"] == "t0000"


def test_tokens_drawn_after_the_last_step_cannot_stretch_a_tokens_budget():
    """Step up to just under the budget, then draw DRAW_AHEAD steps' worth more, train on them and
    return without a run.step(): 1.9x the budget's tokens, status ok, until the ledger asked."""
    ledger = Ledger("tokens", 1000, 0, 512)
    ledger.start()
    for _ in range(7):
        assert ledger.draw(4, 32) is None and not ledger.step(5.0)  # 896 of 1000 tokens
    while ledger.draw(4, 32) is None:
        pass
    assert ledger.drawn > 1.5 * ledger.budget
    assert "returned without counting them" in ledger.uncounted()
    honest = Ledger("tokens", 1000, 0, 512)
    honest.start()
    for _ in range(8):
        honest.draw(4, 32)
        done = honest.step(5.0)
    assert done and honest.draw(4, 32) is not None  # no batch once the budget is spent
    assert honest.uncounted() is None


def test_an_error_or_hypothesis_is_drawn_as_text_never_as_markup():
    """A trial's error is the candidate's (its exception message) and a hypothesis the agent's: in
    the live table, "[/dim]" stopped the display and "[bold]ok val_bpb 0.01" was drawn as such."""
    from rich.console import Console

    from study.loop import StopRules, StudyState
    from study.progress import LiveDisplay
    from study.records import Candidate, Result, Trial

    forged = "[/dim] [bold green]ok val_bpb 0.0100[/bold green] [link=file:///etc/passwd]x[/link]"
    trial = Trial(trial_id="t0001", index=1, candidate=Candidate(source="", hypothesis=forged), objective={}, seed=1)
    state = StudyState(history=[(trial, Result(status="crash", error=f"the model failed: {forged}"))])
    console = Console(record=True, width=400, force_terminal=True)
    console.print(LiveDisplay("study", False, {}).render(state, StopRules(max_trials=2)))
    text, styled = console.export_text(), console.export_text(styles=True)
    assert "[bold green]ok val_bpb 0.0100[/bold green]" in text  # shown as the characters it is
    assert "file:///etc/passwd" not in styled.replace(forged, "")  # no hyperlink made of it


def test_a_header_nested_too_deep_is_a_bad_message_not_a_harness_error():
    """A worker that sends JSON nested 30,000 deep made the trusted side raise
    RecursionError, which the harness reported as its own error."""
    import socket
    import struct

    from train import wire

    ours, theirs = socket.socketpair()
    with ours, theirs:
        head = ("[" * 30000 + "]" * 30000).encode()
        theirs.sendall(struct.pack("!IQ", len(head), 0) + head)
        with pytest.raises(wire.WireError, match="bad header"):
            wire.recv(ours)


def _harness_lines_for_a_flood_of(op: str) -> list[str]:
    """The lines the harness logs while a worker sends 5,000 `op` messages and then fails."""
    import socket
    from types import SimpleNamespace

    import numpy as np

    from train import wire
    from train.trainer import WorkerFailed, serve_training

    def flood(sock):
        for _ in range(5000):
            wire.send(sock, {"op": op})
        wire.send(sock, {"op": "failed", "status": "crash", "error": "x"})

    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=flood, args=(theirs,))
        sender.start()
        lines: list[str] = []
        with pytest.raises(WorkerFailed):
            serve_training(SimpleNamespace(sock=ours), Ledger("steps", 8, 1, 512), np.zeros(1000, dtype=np.uint16), 0,
                           time.time() + 120, lines.append)
        sender.join()
    return lines


def test_a_worker_cannot_make_the_harness_write_without_bound():
    """Each "started" message was one harness line in run.log: written by the trusted side, so no
    sandbox disk limit held a worker sending millions of them."""
    assert len(_harness_lines_for_a_flood_of("started")) == 1


def test_showing_the_end_of_a_gigabyte_run_log_reads_only_its_end(tmp_path):
    """run.log holds whatever the candidate printed, up to disk_mb: the launchers' failure tail,
    MLflow's log artifact and the agent's log tool read it whole (546 MB of memory for a 256 MB log)."""
    from launchers.base import log_tail

    with open(tmp_path / LOG_FILE, "wb") as log:
        log.truncate(1 << 30)  # a sparse gigabyte of what the candidate printed
        log.seek(1 << 30)
        log.write(b"\nTraceback (most recent call last):\nRuntimeError: the last line\n")
    assert log_tail(tmp_path, 2) == "Traceback (most recent call last):\nRuntimeError: the last line"


def test_a_loss_too_large_for_a_float_is_a_nan_not_a_harness_error():
    """The worker sends its loss as JSON: an integer of 400 digits is valid JSON, and float() of it
    raised OverflowError in the trusted ledger, which the harness reported as its own error."""
    from train.contract import TrialFailed

    ledger = Ledger("steps", 8, 1, 512)
    ledger.start()
    ledger.draw(4, 64)
    with pytest.raises(TrialFailed) as failed:
        ledger.step(10 ** 400)
    assert failed.value.status == "nan"


def _peeker_at(spec, seq_len: int, position: int):
    """A bigram model of the train split, exported as the scorer reads it, that also reads the next
    token at one fixed position of every row (30 nats on it): the one place it cheats."""
    import numpy as np

    from train import graph

    vocab = spec.vocab_size
    train = np.asarray(spec.train_tokens(), dtype=np.int64)
    counts = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab) + 0.1
    table = np.log(counts / counts.sum(1, keepdims=True)).astype(np.float32).tobytes()
    eye = (np.eye(vocab, dtype=np.float32) * 30).tobytes()
    nodes = [
        {"name": "e", "op": "aten.embedding.default", "args": [{"ref": "w"}, {"ref": "idx"}], "kwargs": {}},
        {"name": "nxt", "op": "aten.roll.default", "args": [{"ref": "idx"}, [-1], [1]], "kwargs": {}},
        {"name": "hot", "op": "aten.embedding.default", "args": [{"ref": "eye"}, {"ref": "nxt"}], "kwargs": {}},
        {"name": "n", "op": "aten.sym_size.int", "args": [{"ref": "idx"}, 1], "kwargs": {}},
        {"name": "pos", "op": "aten.arange.default", "args": [{"ref": "n"}],
         "kwargs": {"dtype": {"dtype": "int64"}, "device": {"device": "cpu"}}},
        {"name": "at", "op": "aten.eq.Scalar", "args": [{"ref": "pos"}, position], "kwargs": {}},
        {"name": "atf", "op": "aten._to_copy.default", "args": [{"ref": "at"}], "kwargs": {"dtype": {"dtype": "float32"}}},
        {"name": "m", "op": "aten.view.default", "args": [{"ref": "atf"}, [1, -1, 1]], "kwargs": {}},
        {"name": "bump", "op": "aten.mul.Tensor", "args": [{"ref": "hot"}, {"ref": "m"}], "kwargs": {}},
        {"name": "logits", "op": "aten.add.Tensor", "args": [{"ref": "e"}, {"ref": "bump"}], "kwargs": {}}]
    head = json.dumps({"format": graph.FORMAT, "inputs": [{"name": "w", "tensor": "w"}, {"name": "eye", "tensor": "eye"},
                                                          {"name": "idx", "input": True}],
                       "tensors": {"w": {"dtype": "float32", "shape": [vocab, vocab], "offset": 0, "nbytes": len(table)},
                                   "eye": {"dtype": "float32", "shape": [vocab, vocab], "offset": len(table),
                                           "nbytes": len(eye)}},
                       "nodes": nodes, "output": "logits"}).encode()
    raw = struct.pack("<Q", len(head)) + head + table + eye
    return graph.load(raw, graph.Limits(), vocab_size=vocab, seq_len=seq_len)


def test_a_model_that_peeks_at_one_fixed_position_is_caught_as_often_as_two_checks_a_row_promise(objective):
    """Each row has a seam probe at its own secret cut, but the prefix-only runs share two lengths a
    batch: a peek at one fixed position (the second to last) escaped the prefix check in most
    evaluations and the seams in about a third, and passed 33 of 100 on the tiny geometry (a gain
    of 0.038 bits per byte over the honest bigram) and 8 of 60 on the cpu one (0.015, about 2.5
    seed SDs), where two independent checks a row promise (1 - 2/(T-1))^rows: 13% and 1.8%. A
    second seam probe a row, at its own cut, keeps that promise. Seeds are fixed: no luck involved."""
    import numpy as np

    from train import prepare

    spec = prepare.prepare(objective["corpus"], objective["vocab_size"], objective.get("cache_dir"))
    seq_len, tokens, rows = objective["eval_seq_len"], objective["eval_tokens"], objective["eval_batch_size"]
    cheat = _peeker_at(spec, seq_len, seq_len - 2)
    passed = 0
    for seed in range(40):
        try:
            prepare.evaluate_bpb(cheat, spec, tokens, seq_len, rows, "cpu", rng=np.random.default_rng(seed),
                                 check_lengths=cheat.check_lengths)
            passed += 1
        except prepare.NotCausal:
            pass
    windows = -(-tokens // seq_len)
    promised = (1 - 2 / (seq_len - 1)) ** windows  # 0.13 for 64 rows of 64
    assert passed <= 40 * promised + 3, passed


LOCK_OFFSET = 0x5EED_0000_0042  # where the speaker's read lock starts: 45 bits any trial could choose


@pytest.mark.parametrize("level", LEVELS)
def test_two_concurrent_trials_pass_nothing_through_file_locks_or_file_events(world, level):  # noqa: F811
    """Trials of parallel slots read the same files. A POSIX read lock on one of them (a read-only
    descriptor is enough) can start at any of 2^63 offsets, which F_GETLK in another trial reads
    back (and /proc/locks at `landlock`); flock and inotify's access events carry a bit a file:
    measured, one trial read 64 KB another left in locks on the interpreter in 1.4 s, so two
    colluding trials could average their weights as they train (twice the budget each). In the
    sandbox file locks are no-ops, lock queries and file-event watches are refused."""
    import dataclasses
    import fcntl

    target = os.path.realpath(sys.executable)
    folder = os.path.dirname(os.__file__)  # the standard library's folder: readable by every trial

    def listener(talk_in: int, say):
        libc = ctypes.CDLL(None, use_errno=True)
        events = libc.inotify_init1(os.O_NONBLOCK)
        watched = libc.inotify_add_watch(events, target.encode(), 0x1 | 0x20) if events >= 0 else -1  # access, open
        report = {"watching": watched >= 0}
        say("ready")
        os.read(talk_in, 1)  # the speaker has spoken
        fd = os.open(target, os.O_RDONLY)
        try:
            query = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            kind, _, start, _, _ = struct.unpack("hhqqi", query)
            report["lock_seen_at"] = start if kind != fcntl.F_UNLCK else None
        except OSError as e:
            report["lock_seen_at"] = f"refused ({e.errno})"
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            report["flock_blocked"] = False
        except OSError:
            report["flock_blocked"] = True
        try:
            report["proc_locks"] = sum(str(LOCK_OFFSET) in line for line in open("/proc/locks"))
        except OSError:
            report["proc_locks"] = 0
        try:
            report["events"] = len(os.read(events, 4096)) // 16 if events >= 0 else 0
        except BlockingIOError:
            report["events"] = 0
        return report

    def speaker(_, say):
        fd = os.open(target, os.O_RDONLY)
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, LOCK_OFFSET)
        fcntl.flock(os.open(folder, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
        say("spoken")
        return {}

    def start(body, name: str):
        """`body(talk_in, say)` in a confined fork with its own scratch; (tree, its output, our end of its input)."""
        scratch = world.root / name
        scratch.mkdir()
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        policy = dataclasses.replace(world.policy(), scratch=scratch, keep_fds=(out_w, in_r))

        def confined() -> None:
            sandbox.confine(policy, level)

            def say(line: str) -> None:
                os.write(out_w, (line + "\n").encode())

            say(json.dumps(body(in_r, say)))
            if name == "speaker":
                time.sleep(60)  # holds its locks until killed

        pid = fork_running(confined, failed_code=70)
        os.close(out_w)
        os.close(in_r)
        tree = sandbox.ProcessTree(pid, policy, level)
        world.trees.append(tree)
        return tree, os.fdopen(out_r), in_w

    _, heard, talk = start(listener, "listener")
    assert heard.readline().strip() == "ready"
    speaking, said, _ = start(speaker, "speaker")
    assert said.readline().strip() == "spoken"
    os.write(talk, b"x")
    report = json.loads(heard.readline())
    speaking.kill_all()
    if both(level):
        assert report == {"watching": False, "lock_seen_at": "refused (1)", "flock_blocked": False, "proc_locks": 0,
                          "events": 0}, report
    else:  # the control: every channel carries
        assert report["lock_seen_at"] == LOCK_OFFSET and report["flock_blocked"] and report["events"] >= 1, report


@pytest.mark.parametrize("stall", ["never-reads-the-batch-it-asked-for", "sends-half-a-message"])
def test_a_worker_that_stalls_mid_message_ends_at_the_hard_limit_not_never(stall):
    """The harness sent each batch with a blocking sendall and read each request to its end: a
    worker that asked for a 128 MB batch and never read it, or sent the first bytes of a message
    and nothing more, held the trusted harness past its hard limit for good (through the harness:
    still blocked at 300 s of a 60 s limit; the launcher's backstop killed it later, no result)."""
    import socket
    from types import SimpleNamespace

    import numpy as np

    from train import wire
    from train.contract import TrialFailed
    from train.trainer import serve_training

    ours, theirs = socket.socketpair()
    with ours, theirs:
        if stall == "never-reads-the-batch-it-asked-for":
            wire.send(theirs, {"op": "batches", "batch_size": 4096, "seq_len": 4095})
            wire.send(theirs, {"op": "next", "stream": 0})
        else:
            theirs.sendall(struct.pack("!IQ", 1000, 0) + b'{"op": ')
        outcome = {}

        def serve():
            try:
                serve_training(SimpleNamespace(sock=ours), Ledger("steps", 8, 1, 512),
                               np.zeros(1 << 20, dtype=np.uint16), 0, time.time() + 2, lambda line: None)
            except TrialFailed as e:
                outcome["status"] = e.status

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        server.join(120)  # a guard, not a timing: without the fix it never returns
        assert not server.is_alive(), "the harness is still blocked on the worker"
        assert outcome == {"status": "timeout"}


def test_a_worker_cannot_make_the_harness_hold_a_stream_for_every_request():
    """Each run.batches() request left a generator in the harness (about 400 bytes, for a 60-byte
    request, 13,000 a second): within a cpu-preset hard limit, 5-11 GB of the trusted side's memory.
    An iterator is meant to be made once; the harness keeps at most MAX_STREAMS."""
    import socket
    from types import SimpleNamespace

    import numpy as np

    from train import wire
    from train.contract import TrialFailed
    from train.trainer import MAX_STREAMS, serve_training

    def flood(sock):
        try:
            for _ in range(MAX_STREAMS + 1):
                wire.send(sock, {"op": "batches", "batch_size": 1, "seq_len": 1})
                wire.recv(sock)
            wire.send(sock, {"op": "failed", "status": "crash", "error": "flooded"})
        except (wire.WireError, OSError):  # the harness refused and hung up
            pass

    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=flood, args=(theirs,), daemon=True)
        sender.start()
        with pytest.raises(TrialFailed, match="run.batches") as refused:
            serve_training(SimpleNamespace(sock=ours), Ledger("steps", 8, 1, 512), np.zeros(1000, dtype=np.uint16), 0,
                           time.time() + 300, lambda line: None)
        assert refused.value.status == "invalid"
        ours.shutdown(socket.SHUT_RDWR)
        sender.join(60)


def test_a_worker_cannot_make_the_harness_write_a_line_for_every_exporting_message():
    """As with "started" (above): each "exporting" message was a line of the harness's own in
    run.log, written outside the cap on what the sandbox prints."""
    assert len(_harness_lines_for_a_flood_of("exporting")) == 1
