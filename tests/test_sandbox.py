"""The sandbox against real escapes: a forked child confines itself, then tries what an adversarial
train.py would; each attempt must fail at every confining level this host offers, and succeed at
`none`, so each test shows it would catch the protection missing."""
from __future__ import annotations

import encodings.idna  # noqa: F401 - socket needs it, and a parent dropped to nobody cannot import it later
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from train import sandbox
from train.sandbox import Policy, ProcessTree, confine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux only")

CONFINING = [level for level in sandbox.LEVELS[:-1]
             if sandbox.LEVELS.index(level) >= sandbox.LEVELS.index(sandbox.available_level())]
SECRET = "sk-ant-fake-0123456789"
REPORT = "report.json"


def attempt(action) -> str:
    """'ok: <value>' if the action worked, 'denied: <error>' if the kernel refused it."""
    try:
        return f"ok: {action()}"
    except OSError as e:
        return f"denied: {type(e).__name__} {e.errno}"


@dataclass
class World:
    """A fake project around a trial: what it may read, and what it must not reach."""

    root: Path
    trees: list = field(default_factory=list)

    def __post_init__(self):
        for folder in ("venv/lib/site-packages", "project/train", "study/trials/t0001", "data", "scratch"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "project/train/run_api.py").write_text("BUDGET = 1\n")
        (self.root / "data/val.bin").write_text("VALIDATION TOKENS")
        (self.root / "study/journal.jsonl").write_text('{"event": "trial_done"}\n')
        (self.root / "study/trials/t0001/result.json").write_text('{"val_bpb": 1.5}')

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def policy(self, **overrides) -> Policy:
        readable = sandbox.python_readable() + (self.root / "venv", self.root / "project/train")
        return Policy(scratch=self.scratch, readable=readable, env=sandbox.allowed_env(self.scratch), **overrides)

    def run(self, level: str, attack, *, wait_s: float = 60, **overrides) -> Ran:
        """Fork, confine, run `attack(world)` in the child and return what it reported and the
        parent's handle on its tree."""
        policy = self.policy(**overrides)

        def confined_attack() -> None:
            confine(policy, level)
            (Path(policy.scratch) / REPORT).write_text(json.dumps(attack(self) or {}))

        pid = fork_running(confined_attack, failed_code=70)
        tree = ProcessTree(pid, policy, level)
        self.trees.append(tree)
        code = wait(pid, wait_s)
        if code is None:
            tree.kill_all()
            code = wait(pid, 10)
        report_file = Path(policy.scratch) / REPORT
        report = json.loads(report_file.read_text()) if report_file.exists() else None
        return Ran(code=code, report=report, tree=tree)


@dataclass
class Ran:
    code: int | None
    report: dict | None
    tree: ProcessTree


def wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


def fork_running(body, failed_code: int = 1) -> int:
    """Fork; the child runs `body()` and exits 0, or prints its traceback (the test shows it) and
    exits `failed_code`. The child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = failed_code
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 - the test reads the traceback and the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def in_fork(body, wait_s: float = 120) -> dict:
    """Run `body()` in a fork of this test, which may confine itself or drop its privileges for
    good (neither can be undone in the test's own process); return what it returned, as JSON."""
    read, write = os.pipe()
    pid = fork_running(lambda: os.write(write, json.dumps(body()).encode()))
    assert wait(pid, wait_s) == 0
    return json.loads(os.read(read, 65536))


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    for tree in w.trees:
        tree.close()


@pytest.fixture
def outsider():
    """A process outside the sandbox (a stand-in for the orchestrator) with a secret in its
    environment."""
    proc = subprocess.Popen(["sleep", "120"], env={"FAKE_API_KEY": SECRET, "PATH": "/usr/bin:/bin"})
    yield proc
    proc.kill()
    proc.wait()


def both(level):
    """The confining levels must deny; `none` is the control that shows the attack is real."""
    return level != "none"


LEVELS = CONFINING + ["none"]


# ----------------------------------------------------------------------------------------------
# Files


@pytest.fixture
def shared_memory_secret():
    """A file in the host's /dev/shm, where other processes' shared memory lives."""
    path = Path(f"/dev/shm/arena-sandbox-test-{os.getpid()}")
    path.write_text(SECRET)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_reads_nothing_outside_its_readable_paths(world, outsider, shared_memory_secret, level):
    parent = os.getpid()

    def attack(w):
        return {
            "val": attempt(lambda: (w.root / "data/val.bin").read_text()),
            "journal": attempt(lambda: (w.root / "study/journal.jsonl").read_text()),
            "sibling": attempt(lambda: (w.root / "study/trials/t0001/result.json").read_text()),
            "listing": attempt(lambda: os.listdir(w.root / "study")),
            "via_proc_root": attempt(lambda: Path(f"/proc/self/root{w.root}/data/val.bin").read_text()),
            "outsider_env": attempt(lambda: Path(f"/proc/{outsider.pid}/environ").read_bytes().decode()),
            "parent_env": attempt(lambda: Path(f"/proc/{parent}/environ").read_bytes().decode()),
            "init_env": attempt(lambda: Path("/proc/1/environ").read_bytes().decode()),
            "shm": attempt(lambda: shared_memory_secret.read_text()),
            "own_code": attempt(lambda: (w.root / "project/train/run_api.py").read_text()),
        }

    ran = world.run(level, attack)
    assert ran.code == 0 and ran.report["own_code"] == "ok: BUDGET = 1\n"
    reached = {k: v for k, v in ran.report.items() if k != "own_code" and v.startswith("ok")}
    if level == "none":
        assert "VALIDATION" in reached["val"] and SECRET in reached["outsider_env"] and SECRET in reached["shm"]
    else:
        assert reached == {}
        assert SECRET not in json.dumps(ran.report)


@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_writes_nothing_outside_its_scratch(world, level):
    pth = world.root / "venv/lib/site-packages/evil.pth"
    code = world.root / "project/train/run_api.py"

    def attack(w):
        return {
            "pth": attempt(lambda: pth.write_text("import os; os.system('touch /tmp/pwned')\n")),
            "append": attempt(lambda: code.open("a").write("BUDGET = 10**9\n")),
            "rename": attempt(lambda: os.rename(w.root / "study/trials/t0001/result.json", w.scratch / "stolen")),
            "journal": attempt(lambda: (w.root / "study/journal.jsonl").open("a").write("{}\n")),
            "tmp": attempt(lambda: Path("/tmp/arena-sandbox-escape").write_text("x")),
            "chmod": attempt(lambda: os.chmod(code, 0o777)),
            "utime": attempt(lambda: os.utime(w.root / "study/journal.jsonl", (0, 0))),
            "scratch": attempt(lambda: (w.scratch / "weights.pt").write_bytes(b"\0" * 1000)),
        }

    mode = code.stat().st_mode
    ran = world.run(level, attack)
    assert ran.code == 0 and ran.report["scratch"].startswith("ok")
    if level == "none":
        assert pth.exists() and "10**9" in code.read_text() and code.stat().st_mode & 0o777 == 0o777
        assert (world.root / "study/journal.jsonl").stat().st_mtime == 0
        pth.unlink()
        Path("/tmp/arena-sandbox-escape").unlink(missing_ok=True)
    else:
        assert not pth.exists() and code.read_text() == "BUDGET = 1\n" and code.stat().st_mode == mode
        assert (world.root / "study/journal.jsonl").stat().st_mtime > 0
        assert (world.root / "study/journal.jsonl").read_text() == '{"event": "trial_done"}\n'
        assert (world.root / "study/trials/t0001/result.json").exists()
        assert not Path("/tmp/arena-sandbox-escape").exists()
        assert all(v.startswith("denied") for k, v in ran.report.items() if k != "scratch")


@pytest.mark.parametrize("level", CONFINING)
def test_the_scratch_holds_no_more_than_disk_mb(world, level):
    def attack(w):
        written = 0
        chunk = b"\1" * 2**20
        try:
            for i in range(64):
                with open(w.scratch / f"blob{i}", "wb") as f:
                    for _ in range(4):
                        f.write(chunk)
                        written += len(chunk)
        except OSError as e:
            stopped = e.errno
        else:
            stopped = None
        for blob in w.scratch.glob("blob*"):  # room for the report
            blob.unlink()
        return {"written_mb": written / 2**20, "stopped": stopped}

    ran = world.run(level, attack, disk_mb=16)
    if ran.report is not None:  # stopped by the kernel (tmpfs full, file too large)
        assert ran.report["stopped"] is not None and ran.report["written_mb"] <= 16
    else:  # or killed by the watcher
        assert ran.tree.killed_for == "disk"


# ----------------------------------------------------------------------------------------------
# Network


@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_opens_no_connection_and_binds_no_port(world, level):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    udp_address = udp.getsockname()

    def attack(w):
        def connect():
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"exfiltrated")
            return "connected"

        def send_udp():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                return s.sendto(b"exfiltrated", udp_address)

        def bind():
            with socket.create_server(("127.0.0.1", 0)) as s:
                return s.getsockname()[1]

        def unix():
            with socket.socket(socket.AF_UNIX) as s:
                s.connect("\0arena-sandbox-test")
            return "connected"

        return {"tcp": attempt(connect), "udp": attempt(send_udp), "bind": attempt(bind), "unix": attempt(unix)}

    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0arena-sandbox-test")
    abstract.listen()
    try:
        ran = world.run(level, attack)
        accepted = _accepts(listener)
        try:
            datagram = udp.recv(100)
        except TimeoutError:
            datagram = None
    finally:
        listener.close()
        udp.close()
        abstract.close()
    assert ran.code == 0
    if level == "none":
        assert accepted and datagram == b"exfiltrated" and ran.report["bind"].startswith("ok")
    else:
        assert not accepted and datagram is None
        assert all(v.startswith("denied") for v in ran.report.values()), ran.report


def _accepts(listener) -> bool:
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


# ----------------------------------------------------------------------------------------------
# Processes


@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_cannot_type_into_its_terminal(world, level):
    """TIOCSTI pushes characters into a terminal's input as if its user typed them (a command for
    the operator's shell): refused even on the trial's own controlling terminal."""
    import dataclasses
    import fcntl
    import termios
    import tty

    legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
    if level == "none" and os.geteuid() != 0 and legacy.exists() and legacy.read_text().strip() == "0":
        pytest.skip("this kernel refuses TIOCSTI to everyone but root: the control cannot type either")

    master, slave = os.openpty()
    tty.setraw(slave)
    policy = dataclasses.replace(world.policy(), keep_fds=(10,))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            os.dup2(os.open(os.ttyname(slave), os.O_RDWR), 10)  # now its controlling terminal
            confine(policy, level)
            (world.scratch / REPORT).write_text(json.dumps({"typed": attempt(
                lambda: [fcntl.ioctl(10, termios.TIOCSTI, c) for c in (b"!", b"\n")])}))
            code = 0
        finally:
            os._exit(code)
    tree = ProcessTree(pid, policy, level)
    world.trees.append(tree)
    assert wait(pid, 60) == 0
    report = json.loads((world.scratch / REPORT).read_text())
    os.set_blocking(slave, False)
    try:
        typed = os.read(slave, 10)
    except BlockingIOError:
        typed = b""
    os.close(master)
    os.close(slave)
    if level == "none":
        assert typed == b"!\n"
    else:
        assert report["typed"].startswith("denied") and typed == b""



@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_signals_nothing_outside_it(world, outsider, level):
    parent = os.getpid()

    def attack(w):
        return {"outsider": attempt(lambda: os.kill(outsider.pid, signal.SIGKILL)),
                "parent": attempt(lambda: os.kill(parent, 0))}

    ran = world.run(level, attack)
    assert ran.code == 0
    if level == "none":
        outsider.wait(timeout=10)  # the kill landed (a loaded machine may take a moment to reap it)
    else:
        time.sleep(0.1)
        assert outsider.poll() is None
        assert all(v.startswith("denied") for v in ran.report.values()), ran.report


@pytest.mark.parametrize("level", LEVELS)
def test_kill_all_ends_a_double_forked_setsid_grandchild(world, level):
    """The grandchild leaves its session and its parent; kill_all still finds it, and the file it
    would write after a pause never appears."""
    marker = world.scratch / "survived"

    def attack(w):
        read, write = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                time.sleep(1.0)
                marker.write_text("I outlived the trial")
                os._exit(0)
            os._exit(0)
        return {"grandchild": int(os.read(read, 20))}

    ran = world.run(level, attack)
    assert ran.code == 0
    ran.tree.kill_all()
    time.sleep(1.5)
    assert not marker.exists()
    assert not ran.tree.alive()
    if level != "namespaces":  # inside a PID namespace the number it saw is not its host pid
        with pytest.raises(ProcessLookupError):
            os.kill(ran.report["grandchild"], 0)


def fork_bomb(world):
    """Fork sleepers until the sandbox says no: how many got through, and the errno that stopped it."""
    children = 0
    try:
        for _ in range(500):
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
    except OSError as e:
        return {"children": children, "stopped": e.errno}
    return {"children": children, "stopped": None}


@pytest.mark.parametrize("level", CONFINING)
def test_a_fork_bomb_stops_at_max_processes(world, level):
    ran = world.run(level, fork_bomb, max_processes=20)
    assert ran.code == 0 and ran.report["stopped"] is not None
    # a cgroup counts the tree exactly; RLIMIT_NPROC counts all the user's tasks at confine() time plus 20
    assert ran.report["children"] < (20 if ran.tree.mechanisms()["processes"] == "cgroup" else 40)
    ran.tree.kill_all()
    assert not ran.tree.alive()


@pytest.mark.parametrize("level", CONFINING)
def test_a_memory_hog_leaves_kernel_evidence_of_its_oom(world, level):
    def attack(w):
        hog = []
        for _ in range(40):
            hog.append(bytearray(b"\1" * (20 * 2**20)))  # touched: resident, not just reserved
        return {"allocated_mb": 20 * len(hog)}

    ran = world.run(level, attack, memory_mb=200)
    assert ran.report is None  # killed before it could report
    assert ran.tree.oom_killed()
    assert ran.tree.peak_memory_mb() >= 150


def test_a_trial_within_its_memory_is_not_called_oom(world):
    ran = world.run(CONFINING[0], lambda w: {"mb": len(bytearray(b"\1" * (20 * 2**20))) // 2**20}, memory_mb=400)
    assert ran.code == 0 and ran.report == {"mb": 20}
    assert not ran.tree.oom_killed()


@pytest.mark.parametrize("level", CONFINING)
def test_cpu_seconds_counts_the_whole_tree_from_the_kernel(world, level):
    def attack(w):
        def burn(seconds):
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass

        if os.fork() == 0:  # a child that burns too, and is reaped before the trial ends
            burn(0.6)
            os._exit(0)
        burn(0.6)
        os.wait()
        return {}

    ran = world.run(level, attack)
    assert ran.code == 0
    assert 1.0 <= ran.tree.cpu_seconds() <= 10.0


# ----------------------------------------------------------------------------------------------
# The environment and undoing the sandbox


def test_the_environment_holds_no_secret_even_when_the_parent_had_one(tmp_path):
    """A harness started with secrets in its environment forks a trial: the trial's os.environ and
    its /proc/self/environ (the block inherited from the parent's exec) hold none of them."""
    (tmp_path / "scratch").mkdir()
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from train import sandbox
        scratch = Path({str(tmp_path / "scratch")!r})
        policy = sandbox.Policy(scratch=scratch, readable=sandbox.python_readable(), env=sandbox.allowed_env(scratch))
        pid = os.fork()
        if pid == 0:
            sandbox.confine(policy, sys.argv[1])
            print(repr(dict(os.environ)), open("/proc/self/environ", "rb").read().replace(b"\\0", b" ").decode())
            os._exit(0)
        tree = sandbox.ProcessTree(pid, policy, sys.argv[1])
        os.waitpid(pid, 0)
        tree.close()
    """)
    secrets = {"FAKE_API_KEY": SECRET, "AWS_SECRET_ACCESS_KEY": "aws-" + SECRET,
               "DATABASE_URL": "postgres://u:" + SECRET + "@db/x", "OMP_NUM_THREADS": "1"}
    for level in LEVELS:
        out = subprocess.run([sys.executable, "-c", script, level], env={**os.environ, **secrets},
                             cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert SECRET not in out.stdout and "AWS_SECRET" not in out.stdout
        assert "OMP_NUM_THREADS" in out.stdout and str(tmp_path / "scratch") in out.stdout


@pytest.mark.parametrize("level", CONFINING)
def test_a_trial_cannot_undo_its_confinement(world, level):
    val = world.root / "data/val.bin"

    def attack(w):
        import ctypes

        from train.sandbox import landlock

        libc = ctypes.CDLL(None, use_errno=True)
        report = {"setuid": attempt(lambda: os.setuid(0)),
                  "unshare": attempt(lambda: _check(libc.unshare(0x10000000 | 0x00020000))),  # user + mount
                  "new_ruleset": attempt(lambda: landlock.restrict_self(read=(Path("/"),), write=(Path("/"),))),
                  "ptrace_parent": attempt(lambda: _ptrace_attach(os.getppid()))}
        report["chroot"] = attempt(lambda: _check(libc.chroot(b"/")))
        report["val"] = attempt(lambda: val.read_text())
        report["write"] = attempt(lambda: (w.root / "venv/lib/site-packages/evil.pth").write_text("x"))
        return report

    ran = world.run(level, attack)
    assert ran.code == 0, ran
    assert ran.report["val"].startswith("denied") and ran.report["write"].startswith("denied")
    assert ran.report["unshare"].startswith("denied") and ran.report["chroot"].startswith("denied")
    assert ran.report["ptrace_parent"].startswith("denied")
    assert not (world.root / "venv/lib/site-packages/evil.pth").exists()


def _check(result: int) -> int:
    import ctypes

    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _ptrace_attach(pid: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    return _check(libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None))  # PTRACE_ATTACH


def test_the_namespaces_level_has_a_private_shared_memory(world):
    """multiprocessing's locks live in /dev/shm: there they work, in a /dev/shm of the trial's own."""
    if "namespaces" not in CONFINING:
        pytest.skip("no namespaces level here")

    def attack(w):
        import multiprocessing

        lock = multiprocessing.Lock()
        with lock:
            pass
        (Path("/dev/shm") / "mine").write_text("x")
        return {"shm": sorted(os.listdir("/dev/shm"))}

    ran = world.run("namespaces", attack)
    assert ran.code == 0 and ran.report["shm"] == ["mine"]
    assert not Path("/dev/shm/mine").exists()


# ----------------------------------------------------------------------------------------------
# Torch under the sandbox


@pytest.mark.parametrize("level", CONFINING)
def test_torch_imports_and_trains_a_step_under_confinement(world, level):
    pytest.importorskip("torch")

    def attack(w):
        import torch

        model = torch.nn.Linear(4, 4)
        loss = model(torch.randn(2, 4)).sum()
        loss.backward()
        torch.optim.AdamW(model.parameters()).step()
        torch.save(model.state_dict(), w.scratch / "weights.pt")
        return {"grad": float(model.weight.grad.abs().sum()) > 0, "threads": torch.get_num_threads()}

    ran = world.run(level, attack, memory_mb=4096)
    assert ran.code == 0 and ran.report["grad"] is True
    assert (world.scratch / "weights.pt").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# Levels


def test_a_forced_weaker_level_is_run_and_recorded(world):
    assert sandbox.check_level("landlock") == "landlock"
    ran = world.run("landlock", lambda w: {"pid": os.getpid()})
    assert ran.code == 0 and ran.tree.mechanisms()["level"] == "landlock"
    assert ran.tree.mechanisms()["tree"] != "pid-namespace"


def test_asking_for_a_level_this_host_lacks_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(sandbox, "available_level", lambda: "landlock")
    with pytest.raises(sandbox.SandboxUnavailable) as error:
        sandbox.check_level("namespaces")
    message = str(error.value)
    assert "\n" not in message and "namespaces" in message and "objective.sandbox=landlock" in message
    assert sandbox.check_level("strongest") == "landlock"
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.check_level("chroot")


def test_where_user_namespaces_are_blocked_the_landlock_level_is_the_strongest_and_still_confines(world):
    """A process whose seccomp filter refuses unshare (as a node that blocks user namespaces
    would): the probe finds no namespaces level, asking for it is one clear line, and the landlock
    level still keeps the validation split out."""
    if "landlock" not in CONFINING:
        pytest.skip("no landlock level here")
    from train.sandbox import seccomp
    from train.sandbox.kernel import PR_SET_NO_NEW_PRIVS, prctl

    def without_namespaces() -> dict:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        seccomp.install(deny_metadata=False)
        sandbox.available_level.cache_clear()
        result = {"best": sandbox.available_level()}
        try:
            sandbox.check_level("namespaces")
        except sandbox.SandboxUnavailable as e:
            result["refused"] = str(e)
        ran = world.run("landlock", lambda w: {"val": attempt(lambda: (w.root / "data/val.bin").read_text())})
        result["report"] = ran.report
        ran.tree.close()
        return result

    result = in_fork(without_namespaces)
    assert result["best"] == "landlock"
    assert "\n" not in result["refused"] and "user namespaces are blocked" in result["refused"]
    assert result["report"]["val"].startswith("denied")


def test_python_m_train_sandbox_says_what_this_host_gives():
    out = subprocess.run([sys.executable, "-m", "train.sandbox"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(f"sandbox: strongest level here is {sandbox.available_level()!r}")


def test_confine_refuses_a_multithreaded_process(world):
    def attack(w):
        return {}

    policy = world.policy()
    pid = os.fork()
    if pid == 0:
        import threading

        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        try:
            confine(policy, "landlock")
            os._exit(0)
        except sandbox.SandboxUnavailable:
            os._exit(42)
        os._exit(1)
    assert wait(pid, 30) == 42


# ----------------------------------------------------------------------------------------------
# Root and nobody


REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")  # world-readable, unlike an interpreter under a 0700 /root


@pytest.fixture
def open_world():
    """A World that uid 65534 can traverse (pytest's own tmp folders are 0700 root)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="arena-sandbox-"))
    os.chmod(root, 0o755)
    w = World(root)
    yield w
    for tree in w.trees:
        tree.close()
    shutil.rmtree(root, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _spawn_confined(world: World, level: str, readable: tuple, script: str) -> tuple[dict, ProcessTree]:
    """The GPU path: a fresh interpreter imports the sandbox (unconfined), confines itself first
    thing, then runs `script`, which prints one JSON line."""
    policy = Policy(scratch=world.scratch, readable=readable, env=sandbox.allowed_env(world.scratch))
    head = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from train import sandbox
        sandbox.confine(sandbox.Policy.from_json(sys.argv[1]), sys.argv[2])
        def attempt(action):
            try:
                return f"ok: {{action()}}"
            except OSError as e:
                return f"denied: {{type(e).__name__}} {{e.errno}}"
    """)
    proc = subprocess.Popen([str(SYSTEM_PYTHON), "-P", "-c", head + textwrap.dedent(script), policy.to_json(), level],
                            env=policy.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree = ProcessTree(proc.pid, policy, level)
    world.trees.append(tree)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1]), tree


@needs_root
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("level", LEVELS)
def test_as_root_a_spawned_trial_runs_as_nobody_when_nobody_can_read_its_paths(open_world, level):
    """Landlock lets it read the venv; dropping to uid 65534 still keeps a root-only file there out
    of reach, and the scratch is its own."""
    private = open_world.root / "venv/root-only.key"
    private.write_text(SECRET)
    private.chmod(0o600)
    readable = tuple(p for p in map(Path, ("/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache")) if p.exists())
    report, tree = _spawn_confined(open_world, level, readable + (open_world.root / "venv",), """
        from pathlib import Path
        print(json.dumps({"uid": os.getuid(), "pid": os.getpid(),
                          "private": attempt(lambda: Path(sys.argv[3]).read_text()),
                          "venv": attempt(lambda: os.listdir(Path(sys.argv[3]).parent)),
                          "scratch": attempt(lambda: Path("weights.pt").write_bytes(b"w"))}))
    """.replace("sys.argv[3]", repr(str(private))))
    assert report["venv"].startswith("ok") and report["scratch"].startswith("ok")
    if level == "none":
        assert report["uid"] == 0 and SECRET in report["private"]
    else:
        assert report["uid"] == 65534 and report["private"].startswith("denied")
        assert (open_world.scratch / "weights.pt").read_bytes() == b"w"


@needs_root
@pytest.mark.skipif(not Path("/usr/bin/setpriv").exists() or not SYSTEM_PYTHON.exists(), reason="needs setpriv")
@pytest.mark.parametrize("hardened", [False, True])
def test_a_hardened_orchestrator_hides_its_environment_from_its_own_uid(hardened):
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from train.sandbox import harden_orchestrator; "
            f"{'harden_orchestrator(); ' if hardened else ''}print('ready', flush=True); time.sleep(60)")
    orchestrator = subprocess.Popen([*nobody, str(SYSTEM_PYTHON), "-c", code], stdout=subprocess.PIPE, text=True,
                                    env={"FAKE_API_KEY": SECRET})
    try:
        assert orchestrator.stdout.readline() == "ready\n"
        reader = subprocess.run([*nobody, "cat", f"/proc/{orchestrator.pid}/environ"], capture_output=True,
                                text=True, timeout=30)
    finally:
        orchestrator.kill()
        orchestrator.wait()
    assert (SECRET in reader.stdout) is not hardened


# ----------------------------------------------------------------------------------------------
# Unprivileged: the parent runs as nobody, as on a cluster node


def _as_nobody(world: World, run, uid: int = 65534) -> dict:
    """Run `run(world)` in a fork of this test that dropped to `uid` (nobody); its JSON result."""
    for path in (world.root, *world.root.rglob("*")):
        os.chown(path, uid, uid)

    def as_nobody() -> dict:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        return run(world)

    return in_fork(as_nobody)


@needs_root
@pytest.mark.parametrize("level", CONFINING)
def test_an_unprivileged_parent_still_confines(open_world, outsider, level):
    """Files, signals and the network stay out of reach without root, cgroups or a tmpfs, and the
    tree still dies whole."""
    def attack(world):
        read, write = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1.5)
                (world.scratch / "survived").write_text("x")
                os._exit(0)
            os._exit(0)
        return {"val": attempt(lambda: (world.root / "data/val.bin").read_text()),
                "signal": attempt(lambda: os.kill(outsider.pid, signal.SIGKILL)),
                "tcp": attempt(lambda: socket.create_connection(("127.0.0.1", 9), timeout=1)),
                "uid": os.getuid()}

    def run(world):
        ran = world.run(level, attack)
        ran.tree.kill_all()
        time.sleep(2.0)
        result = {"code": ran.code, "report": ran.report, "mechanisms": ran.tree.mechanisms(),
                  "survived": (world.scratch / "survived").exists(), "alive": ran.tree.alive()}
        ran.tree.close()
        return result

    result = _as_nobody(open_world, run)
    assert result["code"] == 0, result
    report = result["report"]
    assert report["uid"] == 65534
    assert report["val"].startswith("denied") and report["signal"].startswith("denied")
    assert report["tcp"].startswith("denied")
    assert result["mechanisms"]["memory"].startswith("watcher") and result["mechanisms"]["disk"].startswith("watcher")
    assert not result["survived"] and not result["alive"]
    assert outsider.poll() is None


@needs_root
@pytest.mark.parametrize("level", CONFINING)
def test_an_unprivileged_parent_catches_a_memory_hog_by_watching(open_world, level):
    def hog(world):
        chunks = [bytearray(b"\1" * (20 * 2**20)) for _ in range(60)]
        return {"allocated_mb": 20 * len(chunks)}

    def run(world):
        ran = world.run(level, hog, memory_mb=200)
        result = {"report": ran.report, "oom": ran.tree.oom_killed(), "peak": ran.tree.peak_memory_mb(),
                  "memory": ran.tree.mechanisms()["memory"]}
        ran.tree.close()
        return result

    result = _as_nobody(open_world, run)
    assert result["memory"].startswith("watcher")
    assert result["report"] is None and result["oom"] and result["peak"] >= 200


@needs_root
@pytest.mark.parametrize("level", CONFINING)
def test_an_unprivileged_parent_holds_processes_disk_and_counts_cpu(open_world, level):
    """Without a cgroup: RLIMIT_NPROC stops a fork bomb, RLIMIT_FSIZE and the watcher the disk, and
    the CPU time of the tree still comes from the kernel."""

    def fill(world):
        try:
            with open(world.scratch / "blob", "wb") as f:
                for _ in range(64):
                    f.write(b"\1" * 2**20)
        except OSError as e:
            (world.scratch / "blob").unlink()
            return {"stopped": e.errno}
        return {"stopped": None}

    def burn(world):
        end = time.process_time() + 1.0
        while time.process_time() < end:
            pass
        return {}

    def run(world):
        results = {}
        for name, attack, limits in (("bomb", fork_bomb, {"max_processes": 20}), ("fill", fill, {"disk_mb": 16}),
                                     ("burn", burn, {})):
            ran = world.run(level, attack, **limits)
            results[name] = {"code": ran.code, "report": ran.report, "cpu": ran.tree.cpu_seconds(),
                             "killed_for": ran.tree.killed_for, "mechanisms": ran.tree.mechanisms()}
            ran.tree.close()
        return results

    # RLIMIT_NPROC counts every task of the uid, and root's trials run as 65534: a uid of its own, or
    # trials of earlier tests (their zombies, until init reaps them) ending meanwhile leave the bomb room
    results = _as_nobody(open_world, run, uid=65533)
    assert results["bomb"]["mechanisms"]["processes"] == "rlimit"
    # RLIMIT_NPROC counts the whole user's tasks at confine() time plus 20: others ending lets it run a few more
    assert results["bomb"]["report"]["stopped"] is not None and results["bomb"]["report"]["children"] < 40
    filled = results["fill"]
    assert filled["killed_for"] == "disk" or filled["report"]["stopped"] is not None  # EFBIG at 16 MB
    assert 0.8 <= results["burn"]["cpu"] <= 10.0


# -- scratch folders: a dead maker's are swept, nothing else is ------------------------------------------
def test_a_sweep_removes_only_the_scratches_of_dead_makers(tmp_path):
    from train.sandbox.scratch import Scratch, sweep

    hold = ("import sys, time\nfrom train.sandbox.scratch import Scratch\n"
            f"s = Scratch(sys.argv[1], {str(tmp_path)!r})\n(s.path / 'weights').write_bytes(b'x' * 4096)\n"
            "print(s.path, flush=True)\ntime.sleep(120)")
    makers = {role: subprocess.Popen([sys.executable, "-c", hold, role], cwd=REPO, stdout=subprocess.PIPE, text=True)
              for role in ("dead", "alive")}
    try:
        folders = {role: Path(p.stdout.readline().strip()) for role, p in makers.items()}
        makers["dead"].kill()
        makers["dead"].wait()
        assert sweep(tmp_path) == [folders["dead"]]
        assert not folders["dead"].exists() and not folders["dead"].with_name(folders["dead"].name + ".owner").exists()
        assert (folders["alive"] / "weights").exists(), "a live maker's scratch was touched"
        with Scratch("mine", tmp_path) as mine:
            assert sweep(tmp_path) == [] and mine.path.is_dir()
        assert not mine.path.exists() and not mine.owner.exists()
    finally:
        for p in makers.values():
            p.kill()
            p.wait()


@needs_root
def test_a_sweep_never_follows_a_name_another_user_planted(tmp_path):
    """/tmp is everyone's: an owner file someone else made, or a folder name that is a symlink, is
    left alone (a root sweep that followed one would remove, or unmount, what the link points at)."""
    from train.sandbox.scratch import sweep

    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("x")
    (tmp_path / "arena-link.owner").write_text("")
    (tmp_path / "arena-link").symlink_to(target)
    (tmp_path / "arena-theirs").mkdir()
    (tmp_path / "arena-theirs" / "keep").write_text("x")
    (tmp_path / "arena-theirs.owner").write_text("")
    os.chown(tmp_path / "arena-theirs.owner", 65534, 65534)
    assert sweep(tmp_path) == []
    assert (target / "keep").exists() and (tmp_path / "arena-theirs" / "keep").exists()


@pytest.mark.parametrize("level", LEVELS)
def test_a_trial_can_neither_evict_shared_pages_nor_ask_which_are_resident(world, level):
    """Evicting pages of a file every trial reads, and asking which are resident, is how one trial
    would leave bits for a later one in the page cache; both are refused (reading stays, of course)."""
    def attack(w):
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        found = {}
        with open(Path(os.__file__), "rb") as f:  # the standard library: readable by every trial
            view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            found["pageout"] = attempt(lambda: view.madvise(21))  # MADV_PAGEOUT
            found["cold"] = attempt(lambda: view.madvise(20))  # MADV_COLD
            found["dontneed"] = attempt(lambda: view.madvise(mmap.MADV_DONTNEED))  # allocators need it
            view.close()
            page = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, f.fileno(), 0)
            vec = (ctypes.c_ubyte * 1)()
            found["mincore"] = libc.mincore(ctypes.c_void_p(page), ctypes.c_size_t(4096), vec)
            found["mincore_errno"] = ctypes.get_errno()
        return found

    def fadvise(w):
        try:
            with open(Path(os.__file__), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return {"fadvise": "ok"}
        except OSError as e:
            return {"fadvise": f"denied: {e.errno}"}

    ran = world.run(level, attack)
    assert ran.code == 0, ran.report
    advised = world.run(level, fadvise)
    assert advised.code == 0
    if both(level):
        assert ran.report["pageout"].startswith("denied") and ran.report["cold"].startswith("denied")
        assert ran.report["mincore"] == -1 and ran.report["mincore_errno"] == 1  # EPERM
        assert advised.report["fadvise"] == "denied: 1"
    else:
        assert ran.report["pageout"].startswith("ok") and ran.report["mincore"] == 0
        assert advised.report["fadvise"] == "ok"
    assert ran.report["dontneed"].startswith("ok")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give the trial another uid")
def test_as_root_a_trial_at_the_namespaces_level_runs_as_nobody_and_owns_no_file_it_can_read(world):
    """Even where the interpreter lies under a folder nobody may pass (a 0700 /root), the mount
    namespace makes it reachable: the kernel then answers no residency query on files it reads."""
    if "namespaces" not in CONFINING:
        pytest.skip("no namespaces level on this host")

    readable = [Path(sys.executable).resolve(), Path(os.__file__), Path(torch_file())]

    def attack(w):
        return {"uid": os.getuid(), "gid": os.getgid(), "uid_map": open("/proc/self/uid_map").read().split(),
                "reads": [attempt(lambda p=p: len(p.read_bytes()[:16])) for p in readable]}

    ran = world.run("namespaces", attack)
    assert ran.code == 0, ran.report
    assert (ran.report["uid"], ran.report["gid"]) == (65534, 65534)
    assert ran.report["uid_map"] == ["65534", "65534", "1"]  # inside uid 65534 is host uid 65534
    assert all(read == "ok: 16" for read in ran.report["reads"])  # it reads them, through /root's cover
    assert all(p.stat().st_uid != 65534 for p in readable)  # and, on the host, owns none of them


def torch_file() -> str:
    import importlib.util

    return importlib.util.find_spec("torch").origin
