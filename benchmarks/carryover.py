"""What one trial can hand a later one through the page cache, measured through the real sandbox.

Every trial may read the same files (the interpreter, the venv, /usr: processes.readable_paths()),
and their pages stay cached after the trial ends. The seccomp filter refuses the calls that evict
pages (fadvise, madvise COLD/PAGEOUT) or ask which are resident (mincore, cachestat), so what is
left is: a writer trial makes chosen pages resident by reading them, and a later reader trial times
its own reads of the same pages (a cached page is a minor fault, an uncached one a disk read). With
madvise(MADV_RANDOM) (allowed: allocators use madvise) a read fault brings in that one page and no
readahead, so every 4 KiB page of a cold file is one bit; reading it makes it resident, so each page
carries one bit once, until memory pressure evicts it again.

This script runs that attack as a candidate would: a writer and then a reader, each a fork of this
process confined with sandbox.confine() at the strongest level (as tests/test_sandbox.py's World
does, with a worker's readable paths), which agree on the pages by walking the readable trees with
a shared seed. It prints the bits the reader recovered, the error rate, the time each side took, and
from those and the number of cold pages (counted here, outside the sandbox, with mincore) an upper
bound on what a trial can hand a later one, as a fraction of the cpu preset model's weights.

    python benchmarks/carryover.py                    # 4096 bits, one process each side
    python benchmarks/carryover.py --bits 20000 --processes 4

Measured on this machine kind (2 cores, ext4 on virtio, load 3-7): 8.35 GiB readable, 6.9-7.4 GiB
of it cold; 20,000 bits recovered with 6.9-7.9% wrong (almost all 0 -> 1: pages someone else had
read), a writer at ~4,900-7,000 pages/s and a reader at ~8,100-14,800 pages/s with 4 processes
each; the bound is ~133-151 KiB (9.5-10.7% of the cpu preset's 1.44 MB of weights) a hand-over,
at most ~267 KiB (18.5%) if the writer first evicts the cache.
"""
from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import math
import os
import random
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train import sandbox  # noqa: E402
from train.processes import readable_paths  # noqa: E402

PAGE = 4096
MIN_FILE = 64 * PAGE
EDGE = 16  # pages at each end of a file left out (headers and tails are read by everyone)
SENTINELS = 64  # the first SENTINELS bits are always 1, the next SENTINELS always 0: the reader's calibration
HARD_LIMIT_S = 960  # the cpu preset's hard limit (60 s + 600 steps x 1.5 s): the most a trial may run
MADV_RANDOM = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def readable_files(min_size: int = MIN_FILE) -> list[tuple[str, int]]:
    """(path, size) of every regular file of at least `min_size` bytes a worker may read, each inode
    once, in a fixed order: what the writer and the reader both compute on their own."""
    roots = [p for p in readable_paths() if not str(p).startswith(("/proc", "/sys"))]
    seen, files = set(), []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    info = os.stat(path, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and info.st_size >= min_size and (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    files.append((path, info.st_size))
    return sorted(files)


def channel_pages(files: list[tuple[str, int]], count: int, seed: int) -> list[tuple[str, int]]:
    """`count` distinct (path, page) drawn with `seed` from the inner pages of `files`, sorted."""
    usable = [max(0, size // PAGE - 2 * EDGE) for _, size in files]
    starts, total = [], 0
    for n in usable:
        starts.append(total)
        total += n
    chosen = sorted(random.Random(seed).sample(range(total), min(count, total)))
    pages = []
    for g in chosen:
        i = bisect.bisect_right(starts, g) - 1
        pages.append((files[i][0], EDGE + g - starts[i]))
    return pages


def message(bits: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1)
    return [1] * SENTINELS + [0] * SENTINELS + [rng.getrandbits(1) for _ in range(bits)]


class Mapped:
    """The files of the channel, mapped read-only with readahead off."""

    def __init__(self):
        self.maps: dict[str, int] = {}

    def address(self, path: str) -> int:
        if path not in self.maps:
            size = os.path.getsize(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            finally:
                os.close(fd)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            if _libc.madvise(addr, size, MADV_RANDOM) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_RANDOM)")
            self.maps[path] = addr
        return self.maps[path]

    def touch(self, path: str, page: int) -> int:
        """Read one byte of the page; the nanoseconds it took."""
        addr = self.address(path) + page * PAGE
        t0 = time.perf_counter_ns()
        ctypes.c_char.from_address(addr).value  # the read is the point
        return time.perf_counter_ns() - t0


def in_parallel(work, items: list, processes: int) -> list:
    """`work(slice)` over `processes` forks of this (confined) process, results in order."""
    if processes <= 1:
        return work(items)
    chunks = [items[i::processes] for i in range(processes)]
    pipes, pids = [], []
    for chunk in chunks:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(write, json.dumps(work(chunk)).encode())
            finally:
                os._exit(0)
        os.close(write)
        pipes.append(read)
        pids.append(pid)
    parts = []
    for read, pid in zip(pipes, pids):
        data = b""
        while chunk := os.read(read, 1 << 20):
            data += chunk
        os.close(read)
        os.waitpid(pid, 0)
        parts.append(json.loads(data))
    out = [None] * len(items)
    for i, part in enumerate(parts):
        out[i::processes] = part
    return out


def writer(bits: int, seed: int, processes: int) -> dict:
    """The first trial: make resident the pages whose bit is 1."""
    t0 = time.perf_counter()
    files = readable_files()
    walk = time.perf_counter() - t0
    pages = channel_pages(files, bits + 2 * SENTINELS, seed)
    ones = [page for page, bit in zip(pages, message(bits, seed)) if bit]
    mapped = Mapped()
    in_parallel(lambda chunk: [mapped.touch(path, page) for path, page in chunk], ones, processes)
    return {"files": len(files), "walk_s": walk, "seconds": time.perf_counter() - t0}


def reader(bits: int, seed: int, processes: int) -> dict:
    """The later trial: time a read of every page of the channel; fast is 1."""
    t0 = time.perf_counter()
    pages = channel_pages(readable_files(), bits + 2 * SENTINELS, seed)
    walk = time.perf_counter() - t0
    mapped = Mapped()
    times = in_parallel(lambda chunk: [mapped.touch(path, page) for path, page in chunk], pages, processes)
    fast = sorted(times[:SENTINELS])[SENTINELS // 2]
    slow = sorted(times[SENTINELS:2 * SENTINELS])[SENTINELS // 2]
    threshold = math.sqrt(max(fast, 1) * max(slow, 1))
    decoded = [1 if t < threshold else 0 for t in times]
    return {"decoded": decoded[2 * SENTINELS:], "threshold_us": threshold / 1000, "fast_us": fast / 1000,
            "slow_us": slow / 1000, "walk_s": walk, "seconds": time.perf_counter() - t0}


def in_sandbox(body, level: str) -> dict:
    """Fork, confine the child as a trial's worker is (its readable paths, a fresh scratch), run
    `body()` there and return what it returned."""
    scratch = Path(tempfile.mkdtemp(prefix="arena-carryover-"))
    os.chmod(scratch, 0o700)
    read, write = os.pipe()
    policy = sandbox.Policy(scratch=scratch, readable=readable_paths(), env=sandbox.allowed_env(scratch),
                            keep_fds=(write,))
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sandbox.confine(policy, level)
            with os.fdopen(write, "w") as out:
                out.write(json.dumps(body()))
            code = 0
        except BaseException as e:  # noqa: BLE001 - the parent reports it
            os.write(write, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(write)
    tree = sandbox.ProcessTree(pid, policy, level)
    data = b""
    while chunk := os.read(read, 1 << 20):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    tree.kill_all()
    tree.close()
    shutil.rmtree(scratch, ignore_errors=True)
    report = json.loads(data or b'{"error": "the sandboxed child said nothing"}')
    if "error" in report:
        sys.exit(f"error: the sandboxed trial failed: {report['error']}")
    return report


def cold_pages() -> tuple[int, int]:
    """(pages, pages not resident now) of every file a worker may read, counted with mincore by this
    trusted process (the sandbox may not ask): the most bits the cache can hold for a later trial."""
    total = cold = 0
    for path, size in readable_files(1):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            addr = _libc.mmap(None, size, 1, 1, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            continue
        n = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * n)()
        if _libc.mincore(addr, size, vec) == 0:
            total += n
            cold += n - sum(v & 1 for v in bytes(vec))
        _libc.munmap(addr, size)
    return total, cold


def weights_bytes() -> int:
    """Bytes of the cpu preset baseline's float32 weights (what a smuggler would carry over)."""
    import yaml

    from train.knobs import write_knobs

    conf = yaml.safe_load((ROOT / "conf" / "objective" / "cpu.yaml").read_text())
    namespace: dict = {}
    exec(compile(write_knobs((ROOT / "train" / "train.py").read_text(), conf["knobs"]), "train.py", "exec"), namespace)
    model = namespace["build_model"](conf["vocab_size"])
    return sum(p.numel() * p.element_size() for p in model.parameters())


def entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4096, help="payload bits the writer leaves (default 4096)")
    parser.add_argument("--processes", type=int, default=1, help="processes each side reads with (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="the pages and the message (default: fresh)")
    parser.add_argument("--level", default="strongest", help="sandbox level (default: the strongest here)")
    args = parser.parse_args(argv)
    level = sandbox.check_level(args.level)
    if level == "none":
        sys.exit("error: this host has no confining sandbox level; the measurement would not be of a trial")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    load = os.getloadavg()[0]
    total, cold = cold_pages()
    print(f"readable by a worker: {total * PAGE / 2**30:.2f} GiB of files, "
          f"{cold * PAGE / 2**30:.2f} GiB ({cold} pages) not resident now; load average {load:.2f}, level {level}")
    wrote = in_sandbox(lambda: writer(args.bits, seed, args.processes), level)
    read = in_sandbox(lambda: reader(args.bits, seed, args.processes), level)
    sent = message(args.bits, seed)[2 * SENTINELS:]
    got = read["decoded"]
    flips01 = sum(1 for s, g in zip(sent, got) if s == 0 and g == 1)
    flips10 = sum(1 for s, g in zip(sent, got) if s == 1 and g == 0)
    errors = (flips01 + flips10) / len(sent)
    capacity = 1 - entropy(errors)  # bits of message a channel bit carries at this error rate (symmetric bound)
    print(f"writer: {wrote['seconds']:.1f} s ({wrote['walk_s']:.1f} s of it walking {wrote['files']} files), "
          f"{sum(sent)} pages made resident")
    print(f"reader: {read['seconds']:.1f} s ({read['walk_s']:.1f} s of it walking); a resident page {read['fast_us']:.1f} us, a cold one "
          f"{read['slow_us']:.0f} us, threshold {read['threshold_us']:.1f} us")
    print(f"recovered {len(sent)} bits: {flips01 + flips10} wrong ({errors:.2%}: {flips01} 0->1, a page someone "
          f"else read; {flips10} 1->0), {capacity:.3f} bits of message per page")
    rate_w = sum(sent) / max(wrote["seconds"] - wrote["walk_s"], 1e-9)
    rate_r = (len(sent) + 2 * SENTINELS) / max(read["seconds"] - read["walk_s"], 1e-9)
    per_trial = min(rate_r, 2 * rate_w) * HARD_LIMIT_S * capacity  # a reader within one trial's hard limit
    held = cold * capacity
    weights = weights_bytes()
    bound = min(per_trial, held)
    print(f"rate: writer {rate_w:.0f} pages/s made resident, reader {rate_r:.0f} pages/s timed")
    print(f"bound: the cache holds at most {held / 8 / 1024:.0f} KiB for later trials ({cold} cold pages x "
          f"{capacity:.3f}); a reader recovers at most {per_trial / 8 / 1024:.0f} KiB within a trial's "
          f"{HARD_LIMIT_S} s hard limit at this rate")
    print(f"        = {bound / 8 / weights:.1%} of the cpu preset model's {weights / 1e6:.2f} MB of float32 weights "
          f"per trial handed to a later one")
    print(f"ceiling: a writer that first evicts the cache by memory pressure (a trial has no memory limit unless "
          f"objective.memory_mb sets one) has every page of the readable files, one bit each at best: {total} bits = "
          f"{total / 8 / 1024:.0f} KiB, {total / 8 / weights:.1%} of the weights (not run here: it would evict the "
          f"host's whole page cache)")


if __name__ == "__main__":
    main()
